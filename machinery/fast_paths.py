"""How a network's forward passes run: the opt-in fast paths of every script (--amp: bf16 autocast,
--channels_last, --compile), the float32 regions of the meta steps, and the float32 precision settings (--tf32).

  set_tf32, strict_float32     the run option --tf32; strict float32 inside a region        utils.Run; bench, numerics
  fast_module                  a network's methods in their fast variants                  utils.Run.network (through
                                                                                           distributed.Processes); bench, numerics
  eager, float32_meta          regions that run the uncompiled / autocast-free variants     model_vgg_maxl, train_meta_semi;
                                                                                           bench, numerics

With every flag off a network is untouched: a default run is the papers' plain float32 eager run. Plain
PyTorch; nothing here imports another file of this project.
"""
import contextlib

import torch
def set_tf32(tf32):
    """The run option --tf32. True leaves PyTorch's settings as they are (its default: cuDNN convolutions
    may run float32 on TF32 tensor cores, about 10 mantissa bits, on CUDA GPUs since Ampere; matmuls stay
    float32). False: strict float32, TF32 off for cuDNN convolutions and matmuls. No effect on the CPU."""
    if not tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision('highest')


def _float32(out):
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(o) for o in out)
    return out


def _fast_method(inner, device, amp, channels_last):
    def method(x, *args, **kwargs):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = inner(x, *args, **kwargs)
        return _float32(out) if amp else out
    return method


def fast_module(net, device, amp=False, channels_last=False, compile=False, methods=('forward',)):
    """Apply the opt-in fast paths to `net` in place; its parameters, names, state_dict and the
    meta-gradient code (forward_with) are unchanged. Each of `methods` (a batch of images first) gets
    channels-last inputs and runs under bf16 autocast with its floating outputs cast back to float32,
    so every loss is computed in float32; with `compile` it is torch.compile'd. Each method is built in
    its variants (with and without autocast, compiled or not): `float32_meta(net)` runs the ones without
    autocast (the meta steps), `eager(net)` the uncompiled ones (a double backward). With every flag
    off, `net` is untouched."""
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if not (amp or channels_last or compile):
        return net
    variants = {}
    for name in methods:
        inner = getattr(net, name)
        variants[name] = {}
        for use_amp in {amp, False}:
            method = _fast_method(inner, device, use_amp, channels_last) if use_amp or channels_last else inner
            for compiled in {compile, False}:
                variants[name][use_amp, compiled] = torch.compile(method) if compiled else method
    net.__dict__['_fast_paths'] = {'variants': variants, 'mode': (amp, compile)}
    _use_variant(net, amp, compile)
    return net


def _use_variant(net, amp, compiled):
    paths = net.__dict__['_fast_paths']
    paths['mode'] = (amp, compiled)
    for name, variants in paths['variants'].items():
        net.__dict__[name] = variants[amp, compiled]


@contextlib.contextmanager
def _variant(nets, amp=None, compiled=None):
    """Inside: the fast-path modules among `nets` run their methods with autocast and/or compilation
    switched as given (None: as they are); the previous variant is back after."""
    held = [n for n in nets if '_fast_paths' in n.__dict__]
    saved = [n.__dict__['_fast_paths']['mode'] for n in held]
    try:
        for n, (a, c) in zip(held, saved):
            _use_variant(n, a if amp is None else amp, c if compiled is None else compiled)
        yield
    finally:
        for n, (a, c) in zip(held, saved):
            _use_variant(n, a, c)


def eager(*nets):
    """Context manager: inside it the given modules run their uncompiled methods (second-order MAXL
    differentiates through a gradient, which torch.compile cannot do)."""
    return _variant(nets, compiled=False)


@contextlib.contextmanager
def strict_float32():
    """Inside: strict float32 on CUDA (TF32 off for cuDNN convolutions and matmuls, as --tf32 false),
    whatever the run's --tf32 says; the previous settings are back after. No effect on the CPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextlib.contextmanager
def float32_meta(*nets, strict=False):
    """Context manager for a meta step: inside it `nets` compute in float32 whatever --amp says (their
    methods without autocast, and any autocast region around switched off), and with `strict` in strict
    float32 whatever --tf32 says (strict_float32). A meta-gradient taken by finite differences perturbs
    each weight by a few millionths of itself: bf16 (8 mantissa bits) or TF32 (10) rounding of the
    perturbed weights would swallow the difference it measures."""
    device_types = {p.device.type for n in nets for p in n.parameters()} or {'cpu'}
    with contextlib.ExitStack() as stack:
        for kind in device_types:
            stack.enter_context(torch.autocast(kind, enabled=False))
        stack.enter_context(_variant(nets, amp=False))
        if strict:
            stack.enter_context(strict_float32())
        yield
