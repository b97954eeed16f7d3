"""Every network of the three papers, the accuracy counts the scripts score them with, and forward_with
(a network run with other weights, for the meta-gradients).

  VGG16                                  model_vgg_single, model_vgg_human, model_vgg_maxl (both networks)
  MAXL_BACKBONES, backbone               the MAXL scripts' --model: VGG-16, a CIFAR ResNet or a torchvision
                                         ResNet with named heads
  CifarResNet, cifar_resnet              train_sla on CIFAR, SVHN, Fashion-MNIST, the MAXL scripts' --model
                                         (ResNet-20/32/44/56/110, option-A shortcut)
  torchvision_resnet, ImageNetResNet     train_meta_semi and train_sla on the large datasets (torchvision's
                                         ResNet family with a width multiplier; ImageNetResNet: with SLA's heads)
  ConvLarge, ShakeShake26, semi_network  train_meta_semi on CIFAR, SVHN, Fashion-MNIST; plot_features
  AutoEncoder                            model_vgg_human --aux_labels kmeans (the features it clusters)
  accuracy_count                         every script
  topk_count                             train_meta_semi (its top-5 accuracy)
  forward_with                           model_vgg_maxl, train_meta_semi (virtual and perturbed weights)

The benchmarks build these networks too. At width 1 every network has the original code's parameter names
and shapes, so its state_dicts load; `width` scales the channels for quick runs. A new backbone goes here,
with a line in this table.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .options import UserError


def scaled(channels, width):
    return max(1, int(round(channels * width)))


# ----------------------------------------------------------------------------------------------------
# VGG-16 (the MAXL paper)
# ----------------------------------------------------------------------------------------------------

class VGG16(nn.Module):
    """The VGG-16 with batch norm of the MAXL code: five blocks of 2-2-3-3-3 conv3x3-BN-ReLU, each
    closed by a 2x2 max-pool, then one Linear-ReLU-Linear head per task.

    `heads` maps head names to class counts, e.g. {'classifier': 20} (Single, the label generator) or
    {'classifier1': 20, 'classifier2': 100} (Human, MAXL's multi-task network). forward() returns the
    heads' logits in that order (a tensor if there is one head, else a tuple); the softmax of the
    original heads is applied by the caller. At width 1 the parameter names and shapes equal the
    original's (block1.0.weight, ..., classifier1.2.bias), so its state_dicts load.
    `init` is 'xavier_uniform' (the multi-task networks) or 'xavier_normal' (the label generator).
    """

    def __init__(self, heads, width=1.0, init='xavier_uniform'):
        super().__init__()
        filters = [scaled(c, width) for c in (64, 128, 256, 512, 512)]
        convs = [2, 2, 3, 3, 3]
        in_ch = 3
        for b, (out_ch, n) in enumerate(zip(filters, convs), start=1):
            layers = []
            for i in range(n):
                layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, kernel_size=3, padding=1),
                           nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            setattr(self, f'block{b}', nn.Sequential(*layers))
            in_ch = out_ch
        self.head_names = list(heads)
        for name, n_classes in heads.items():
            setattr(self, name, nn.Sequential(nn.Linear(filters[-1], filters[-1]), nn.ReLU(inplace=True),
                                              nn.Linear(filters[-1], n_classes)))
        weight_init = {'xavier_uniform': nn.init.xavier_uniform_, 'xavier_normal': nn.init.xavier_normal_}[init]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                weight_init(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x):
        for b in range(1, 6):
            x = getattr(self, f'block{b}')(x)
        return x.flatten(1)

    def forward(self, x):
        h = self.features(x)
        out = tuple(getattr(self, name)(h) for name in self.head_names)
        return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------------------------------
# CIFAR ResNets (SLA)
# ----------------------------------------------------------------------------------------------------

class DownsampleA(nn.Module):
    """Option-A shortcut (He et al. 2016): keep every second row and column, then append zero channels
    (after the real ones) up to the block's width. No parameters."""

    def __init__(self, extra_channels):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return torch.cat([x, x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])], dim=1)


class ResNetBasicBlock(nn.Module):
    """Post-activation basic block: relu(shortcut(x) + bn_b(conv_b(relu(bn_a(conv_a(x))))))."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv_a = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(channels)
        self.downsample = DownsampleA(channels - in_channels) if stride != 1 or in_channels != channels else None

    def forward(self, x):
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        y = self.bn_b(self.conv_b(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y, inplace=True)


CRESNET_DEPTHS = {f'cresnet{d}': d for d in (20, 32, 44, 56, 110)}


class HeadsOnTrunk(nn.Module):
    """A trunk `base_model` (images -> pooled features) with one linear head per output in `classifiers`:
    features() gives the features, forward() the heads' logits (a tensor for one head, else a tuple)."""

    def features(self, x):
        return self.base_model(x)

    def forward(self, x):
        h = self.features(x)
        out = tuple(head(h) for head in self.classifiers)
        return out[0] if len(out) == 1 else out


class CifarResNet(HeadsOnTrunk):
    """The CIFAR ResNet of the SLA code (ResNet-20/32/44/56/110): conv3x3(16)-BN-ReLU, three stages of
    (depth - 2) / 6 basic blocks with 16, 32, 64 channels (stages 2 and 3 start with stride 2 and the
    option-A shortcut), global average pooling, then one linear head per entry of `heads`.

    Convolutions ~ N(0, sqrt(2 / (9 * out_channels))), batch norm weight 1 / bias 0, heads with PyTorch's
    default Linear init, as the original. At width 1 the parameter names equal the original's without
    its DataParallel prefix (base_model.0.weight, base_model.3.0.conv_a.weight, ..., classifiers.0.weight),
    so its state_dicts load. features() gives the pooled features; forward() the heads' logits (a tensor
    if there is one head, else a tuple).
    """

    def __init__(self, depth, heads, width=1.0):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f'a CIFAR ResNet needs depth 6k+2 (20, 32, 44, 56, 110), got {depth}.')
        k = (depth - 2) // 6
        c = scaled(16, width)                       # stages: c, 2c, 4c (exact doubling at any width)
        stages, in_ch = [], c
        for out_ch, stride in ((c, 1), (2 * c, 2), (4 * c, 2)):
            blocks = [ResNetBasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(k)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.base_model = nn.Sequential(nn.Conv2d(3, c, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(c),
                                        nn.ReLU(inplace=True), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4 * c
        for m in self.base_model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.classifiers = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in heads)


def cifar_resnet(name, heads, width=1.0):
    """'cresnet32' etc. with the given head sizes."""
    if name not in CRESNET_DEPTHS:
        raise UserError(f'unknown model {name!r}: choose one of {", ".join(CRESNET_DEPTHS)}.')
    return CifarResNet(CRESNET_DEPTHS[name], heads, width)


# ----------------------------------------------------------------------------------------------------
# torchvision's ImageNet ResNets (SLA and MetaSemi on the large datasets)
# ----------------------------------------------------------------------------------------------------

TORCHVISION_RESNETS = ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
                       'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2']


def torchvision_resnet(name, num_classes, width=1.0):
    """torchvision's ResNet / ResNeXt / Wide ResNet `name`, from scratch (no pretrained weights), as the
    originals build it. width < 1 scales every layer's channels (quick CPU runs and tests); width 1 is
    torchvision's network itself (its parameter names, init and state_dicts)."""
    from torchvision.models import resnet
    if name not in TORCHVISION_RESNETS:
        raise UserError(f'unknown model {name!r}: choose one of {", ".join(TORCHVISION_RESNETS)}.')
    if width == 1:
        return resnet.__dict__[name](num_classes=num_classes)
    ref = resnet.__dict__[name](num_classes=1)          # its block type, depths, groups and group width

    class Scaled(resnet.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:                             # the first stage takes the (scaled) stem's channels
                self.inplanes = scaled(64, width)
            return super()._make_layer(block, scaled(planes, width), blocks, stride, dilate)

    block = type(ref.layer1[0])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                  # a layer narrowed to nothing is refused below
        net = Scaled(block, [len(ref.layer1), len(ref.layer2), len(ref.layer3), len(ref.layer4)], num_classes,
                     groups=ref.groups, width_per_group=ref.base_width)
    if any(p.numel() == 0 for p in net.parameters()):
        raise UserError(f'--width {width} narrows some layer of {name} to no channels (its groups are '
                        f'{ref.groups} x {ref.base_width}): use a larger --width.')
    stem = scaled(64, width)
    net.conv1, net.bn1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem)
    nn.init.kaiming_normal_(net.conv1.weight, mode='fan_out', nonlinearity='relu')
    net.fc = nn.Linear(scaled(512, width) * block.expansion, num_classes)
    return net


class ImageNetResNet(HeadsOnTrunk):
    """A torchvision ResNet's trunk (conv1 .. layer4, global average pooling) with one linear head per entry
    of `heads`, as the SLA code re-wraps torchvision's networks; the interface of CifarResNet."""

    def __init__(self, name, heads, width=1.0):
        super().__init__()
        net = torchvision_resnet(name, 1, width)
        self.base_model = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                        net.layer4, net.avgpool, nn.Flatten())
        self.feature_dim = net.fc.in_features
        self.classifiers = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in heads)


# ----------------------------------------------------------------------------------------------------
# The MAXL scripts' backbones (--model)
# ----------------------------------------------------------------------------------------------------

MAXL_BACKBONES = ['vgg16', *CRESNET_DEPTHS, *TORCHVISION_RESNETS]


def backbone(name, heads, width=1.0, init='xavier_uniform'):
    """`name` (one of MAXL_BACKBONES) with one head per entry of `heads` (head name -> classes, in order):
    VGG16 (its Linear-ReLU-Linear heads under those names, `init`), a CifarResNet or an ImageNetResNet
    (linear heads classifiers.0, classifiers.1, ..., their own init). forward() gives the heads' logits in
    that order (a tensor for one head, else a tuple) whichever it is."""
    if name == 'vgg16':
        return VGG16(heads, width, init=init)
    if name in CRESNET_DEPTHS:
        return cifar_resnet(name, list(heads.values()), width)
    if name in TORCHVISION_RESNETS:
        return ImageNetResNet(name, list(heads.values()), width)
    raise UserError(f'unknown model {name!r}: choose one of {", ".join(MAXL_BACKBONES)}.')


def head_parameter_names(model):
    """Names of the task-specific (head) parameters of a backbone(...) network; the rest is the shared trunk."""
    heads = set(getattr(model, 'head_names', ['classifiers']))
    return {n for n, _ in model.named_parameters() if n.split('.')[0] in heads}


# ----------------------------------------------------------------------------------------------------
# ConvLarge and shake-shake-26 (MetaSemi)
# ----------------------------------------------------------------------------------------------------

def conv_bn_lrelu(in_ch, out_ch, kernel, padding):
    """Conv (no bias) -> BatchNorm -> LeakyReLU(0.1): one ConvLarge block."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, 1, padding, bias=False), nn.BatchNorm2d(out_ch),
                         nn.LeakyReLU(0.1, inplace=True))


class ConvLarge(nn.Module):
    """The 13-layer ConvLarge of the MetaSemi code: 3x(3x3, 128) - pool - 3x(3x3, 256) - pool - 3x3 512
    (no padding) - 1x1 256 - 1x1 128 - global average pool - linear. Each block is conv-BN-LeakyReLU(0.1);
    with `stochastic`, channel dropout (Dropout2d, p=0.5) follows each max-pool. PyTorch default init.
    At width 1 the parameter names and shapes are the original's (block1.0.weight, ..., classifier.0.bias),
    so its state_dicts load; `width` scales every channel count for quick runs."""

    def __init__(self, num_classes=10, width=1.0, stochastic=True):
        super().__init__()
        c1, c2, c3 = scaled(128, width), scaled(256, width), scaled(512, width)
        specs = [(3, c1, 3, 1), (c1, c1, 3, 1), (c1, c1, 3, 1),
                 (c1, c2, 3, 1), (c2, c2, 3, 1), (c2, c2, 3, 1),
                 (c2, c3, 3, 0), (c3, c2, 1, 0), (c2, c1, 1, 0)]
        for i, spec in enumerate(specs, start=1):
            setattr(self, f'block{i}', conv_bn_lrelu(*spec))
        pool = [nn.MaxPool2d(2, 2)] + ([nn.Dropout2d(0.5)] if stochastic else [])
        self.maxpool = nn.Sequential(*pool)              # one module, used after block 3 and block 6
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c1, num_classes))
        self.feature_dim = c1

    def features(self, x):
        """The globally averaged 128-d feature before the classifier (the paper's Figure 3 embeds it)."""
        for i in range(1, 10):
            x = getattr(self, f'block{i}')(x)
            if i in (3, 6):
                x = self.maxpool(x)
        return self.avg_pool(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.features(x))


class _Shake(torch.autograd.Function):
    """Shake-shake mixing: forward a*g + b*(1-g) with a per-sample gate g ~ U(0,1) in training (0.5 in
    eval); backward with a fresh, independent U(0,1) gate, in eval mode too (as the original)."""

    @staticmethod
    def forward(ctx, a, b, training):
        shape = (a.shape[0],) + (1,) * (a.dim() - 1)
        gate = torch.rand(shape, dtype=a.dtype, device=a.device) if training else a.new_full(shape, 0.5)
        return a * gate + b * (1 - gate)

    @staticmethod
    def backward(ctx, grad):
        gate = torch.rand((grad.shape[0],) + (1,) * (grad.dim() - 1), dtype=grad.dtype, device=grad.device)
        return grad * gate, grad * (1 - gate), None


class ShiftConvDownsample(nn.Module):
    """Stride-2 shortcut: the two diagonal pixel sub-grids side by side, ReLU, grouped 1x1 conv, BN."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(2 * in_ch, out_ch, kernel_size=1, groups=2)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        x = torch.cat((x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]), dim=1)
        return self.bn(self.conv(self.relu(x)))


class ShakeShakeBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride=1, downsample=None):
        super().__init__()
        for branch in 'ab':
            setattr(self, f'conv_{branch}1', nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False))
            setattr(self, f'bn_{branch}1', nn.BatchNorm2d(out_ch))
            setattr(self, f'conv_{branch}2', nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False))
            setattr(self, f'bn_{branch}2', nn.BatchNorm2d(out_ch))
        self.downsample = downsample

    def branch(self, x, name):
        h = getattr(self, f'bn_{name}1')(getattr(self, f'conv_{name}1')(F.relu(x)))
        return getattr(self, f'bn_{name}2')(getattr(self, f'conv_{name}2')(F.relu(h)))

    def forward(self, x):
        mixed = _Shake.apply(self.branch(x, 'a'), self.branch(x, 'b'), self.training)
        return (x if self.downsample is None else self.downsample(x)) + mixed


class ShakeShake26(nn.Module):
    """Shake-shake-26 2x96d with shift-conv downsampling (the MetaSemi code's second architecture):
    conv3x3 stem (16), three stages of 4 shake-shake blocks (96, 192, 384 channels; stride 2 at stages
    2 and 3), 8x8 average pool, linear. Conv init N(0, sqrt(2 / (k*k*out))). Names match the original's."""

    def __init__(self, num_classes=10, width=1.0):
        super().__init__()
        stem, ch = scaled(16, width), scaled(96, width)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        in_ch = stem
        for i, (out_ch, stride) in enumerate(((ch, 1), (2 * ch, 2), (4 * ch, 2)), start=1):
            if stride == 1 and in_ch != out_ch:
                down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            else:
                down = ShiftConvDownsample(in_ch, out_ch) if stride == 2 else None
            blocks = [ShakeShakeBlock(in_ch, out_ch, stride, down)] + [ShakeShakeBlock(out_ch, out_ch) for _ in range(3)]
            setattr(self, f'layer{i}', nn.Sequential(*blocks))
            in_ch = out_ch
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(in_ch, num_classes)
        self.feature_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def semi_network(architecture, num_classes, width=1.0):
    """'convlarge' or 'shakeshake' (shake-shake-26), as the MetaSemi code's -a."""
    if architecture == 'convlarge':
        return ConvLarge(num_classes, width)
    if architecture == 'shakeshake':
        return ShakeShake26(num_classes, width)
    raise UserError(f'unknown architecture {architecture!r}: use convlarge or shakeshake.')


# ----------------------------------------------------------------------------------------------------
# The K-means baseline's autoencoder (model_vgg_human --aux_labels kmeans: its codes are clustered)
# ----------------------------------------------------------------------------------------------------

class AutoEncoder(nn.Module):
    """Three stride-2 4x4 convolutions (w, 2w, 4w channels; 32 -> 16 -> 8 -> 4 pixels, ReLU) and a linear
    layer to the code; the decoder mirrors it (linear, three stride-2 transposed convolutions)."""

    def __init__(self, w, code):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.ReLU(), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * w * 16, code))
        self.decoder = nn.Sequential(
            nn.Linear(code, 4 * w * 16), nn.ReLU(), nn.Unflatten(1, (4 * w, 4, 4)),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(w, 3, 4, 2, 1))

    def forward(self, x):
        return self.decoder(self.encoder(x))


# ----------------------------------------------------------------------------------------------------
# Accuracy counts
# ----------------------------------------------------------------------------------------------------

def accuracy_count(logits_or_probs, target):
    """Number of rows whose argmax is the target, as a tensor of the default float type (summed on the device)."""
    return (logits_or_probs.argmax(1) == target).sum().to(torch.get_default_dtype())


def topk_count(logits, target, k=5):
    """Number of rows whose target is among the k largest scores (top-k accuracy x rows), default float type on the
    device; ties are broken as torch.topk breaks them."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == target[:, None]).any(1).sum().to(torch.get_default_dtype())


# ----------------------------------------------------------------------------------------------------
# Meta-gradients: a network run with other weights
# ----------------------------------------------------------------------------------------------------

def forward_with(model, params, x, buffers=None):
    """Run `model` with the given parameter tensors (a dict name -> tensor) without touching its own.

    Batch-norm running statistics are written into *clones* of the model's buffers, so a virtual
    forward never moves the real statistics (torch.func.functional_call writes into what it is given).
    """
    if buffers is None:
        buffers = {k: v.clone() for k, v in model.named_buffers()}
    return functional_call(model, (params, buffers), (x,))
