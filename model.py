"""AttentionResUNet: a 2D U-Net with residual blocks and attention-gated skips.

The network sees ``in_channels`` neighbouring planes of a stack as channels and
returns logits for the centre plane. Images are ``(N, C, H, W)`` float32
tensors with values in [0, 1]; logits are ``(N, n_classes, H, W)``.
"""
from __future__ import annotations

import copy
import functools
import weakref
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from errors import InputNotFoundError, OutputExistsError, UserError, writing_to

PRECISIONS = ("auto", "fp32", "bf16")
SKIP_MERGES = ("add", "concat")
# The network before SKIP_MERGE / SHORTCUT_NORM existed: checkpoints saved without these keys hold it
# (load_model fills them in, so such a checkpoint loads as the network it was).
PREVIOUS_NETWORK = {"skip_merge": "concat", "shortcut_norm": True}


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm stages; the shortcut (identity, or a 1x1
    projection when the width changes, followed by BatchNorm when
    ``shortcut_norm``) is added before the last ReLU."""

    def __init__(self, in_channels: int, out_channels: int, shortcut_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            if shortcut_norm
            else nn.Conv2d(in_channels, out_channels, 1, bias=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, "Attention U-Net").

    The gating signal ``g`` comes from the next coarser decoder level (half the
    resolution of the skip features ``x``). Both are projected to
    ``inter_channels`` at the coarse resolution, summed, passed through ReLU,
    a 1x1 conv and a sigmoid; the resulting mask is upsampled and multiplied
    onto ``x``.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.theta_x = nn.Conv2d(skip_channels, inter_channels, 2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1, bias=True), nn.BatchNorm2d(1))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the gated skip features and the attention mask ``(N, 1, H, W)`` in [0, 1]."""
        theta = self.theta_x(x)
        phi = self.phi_g(g)
        if phi.shape[-2:] != theta.shape[-2:]:
            phi = F.interpolate(phi, size=theta.shape[-2:], mode="bilinear", align_corners=False)
        attention = torch.sigmoid(self.psi(F.relu(theta + phi, inplace=True)))
        attention = F.interpolate(attention, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * attention, attention


def network_architecture(in_channels: int = 5, n_classes: int = 1, depth: int = 3, base_filters: int = 16,
                         dropout_rate: float = 0.1, input_skip: bool = True, output: str = "logits",
                         skip_merge: str = "add", shortcut_norm: bool = False) -> Dict[str, Any]:
    """The ``architecture`` dict an :class:`AttentionResUNet` of these arguments records (and is saved with)."""
    return dict(in_channels=in_channels, n_classes=n_classes, depth=depth, base_filters=base_filters,
                dropout_rate=dropout_rate, input_skip=input_skip, output=output, skip_merge=skip_merge,
                shortcut_norm=shortcut_norm)


class AttentionResUNet(nn.Module):
    """2D attention residual U-Net.

    Parameters
    ----------
    in_channels : int
        Number of neighbouring planes fed as channels (``TRAIN_Z_SIZE``).
    n_classes : int
        Output channels (1 for a binary mask).
    depth : int
        Number of down-sampling steps.
    base_filters : int
        Width of the first level; each level doubles it.
    dropout_rate : float
        Dropout in the bottleneck.
    input_skip : bool
        Residual prediction: the network learns a correction of the upscaled
        centre plane rather than drawing the output from scratch. For masks it
        adds ``input_skip_gain * (2 * centre - 1)`` to the logits; for
        intensities it adds the centre plane itself.
    output : {'logits', 'intensity'}
        'logits': foreground logits of a mask (apply a sigmoid); 'intensity':
        normalised grey values, used as they are (no sigmoid).
    skip_merge : {'add', 'concat'}
        How a decoder level takes the (attention-gated) encoder features of its
        resolution: added to the upsampled coarser features, or concatenated
        with them as in the original U-Net. 'add' keeps the full-resolution
        level at ``base_filters`` channels, which is where a CPU spends most of
        the time (BatchNorm and convolutions over few channels are bound by
        memory, not arithmetic); same IoU on the stacks measured (docs/ablations.md, "Architecture").
    shortcut_norm : bool
        BatchNorm after the 1x1 projection of a residual block's shortcut
        (the projection then has no bias). Without it the projection carries a
        bias and the block one BatchNorm pass fewer.

    Any H and W are accepted: inputs are padded to a multiple of ``2**depth``
    (by edge replication) and the output is cropped back.
    """

    def __init__(self, in_channels: int = 5, n_classes: int = 1, depth: int = 3, base_filters: int = 16,
                 dropout_rate: float = 0.1, input_skip: bool = True, output: str = "logits",
                 skip_merge: str = "add", shortcut_norm: bool = False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        if output not in ("logits", "intensity"):
            raise ValueError(f"output must be 'logits' or 'intensity', got '{output}'.")
        if skip_merge not in SKIP_MERGES:
            raise ValueError(f"skip_merge must be one of {', '.join(SKIP_MERGES)}, got '{skip_merge}'.")
        self.architecture = network_architecture(in_channels, n_classes, depth, base_filters, dropout_rate,
                                                 input_skip, output, skip_merge, shortcut_norm)
        widths = [base_filters * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths[:-1]:
            self.encoders.append(ResidualBlock(previous, width, shortcut_norm))
            previous = width
        self.bottleneck = nn.Sequential(ResidualBlock(widths[-2], widths[-1], shortcut_norm),
                                        nn.Dropout2d(dropout_rate))
        self.gates = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            coarse, fine = widths[level + 1], widths[level]
            self.gates.append(AttentionGate(fine, coarse, max(fine // 2, 1)))
            self.upsamples.append(nn.ConvTranspose2d(coarse, fine, 2, stride=2))
            merged_width = 2 * fine if skip_merge == "concat" else fine
            self.decoders.append(ResidualBlock(merged_width, fine, shortcut_norm))
        self.head = nn.Conv2d(widths[0], n_classes, 1)
        self.input_skip_gain = nn.Parameter(torch.tensor(4.0)) if input_skip and output == "logits" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (masks) or normalised intensities ``(N, n_classes, H, W)`` for images ``(N, in_channels, H, W)``."""
        height, width = x.shape[-2:]
        multiple = 2 ** self.architecture["depth"]
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        skips = []
        features = padded
        for encoder in self.encoders:
            features = encoder(features)
            skips.append(features)
            features = F.max_pool2d(features, 2)
        features = self.bottleneck(features)
        for gate, upsample, decoder, skip in zip(self.gates, self.upsamples, self.decoders, reversed(skips)):
            gated, _ = gate(skip, features)
            upsampled = upsample(features)
            if self.architecture["skip_merge"] == "concat":
                features = decoder(torch.cat([upsampled, gated], dim=1))
            else:
                features = decoder(upsampled + gated)
        logits = self.head(features)[..., :height, :width]
        centre = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        if self.input_skip_gain is not None:
            logits = logits + self.input_skip_gain * (2.0 * centre - 1.0)
        elif self.architecture["input_skip"]:  # intensities: a correction of the linear upscaling
            logits = logits + centre
        return logits


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm folded into the
    convolution before it (same outputs up to float rounding, fewer passes over
    memory). The model itself is left untouched; a model that is already fused,
    or is no ``AttentionResUNet``, is returned as it is."""
    if not isinstance(model, AttentionResUNet) or getattr(model, "fused", False):
        return model
    fused = copy.deepcopy(model).eval()

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        return fuse_conv_bn_eval(conv, bn)

    for block in fused.modules():
        if isinstance(block, ResidualBlock):
            block.conv1, block.bn1 = fold(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fold(block.conv2, block.bn2), nn.Identity()
            if isinstance(block.shortcut, nn.Sequential):
                block.shortcut = fold(block.shortcut[0], block.shortcut[1])
        elif isinstance(block, AttentionGate):
            block.psi = fold(block.psi[0], block.psi[1])
    fused.fused = True
    return fused


class CompiledNetwork(nn.Module):
    """A network compiled by ``torch.compile`` with a dynamic batch size.

    One compilation per tile shape then serves every batch size (the tiles of a
    chunk of planes, the last short batch). A batch of one sample is run
    duplicated, because the compiler specialises the sizes 0 and 1 and would
    compile again for it. A compiler failure (no C++ compiler for inductor, no
    Triton for CUDA, a compiler bug) becomes one clear error.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.architecture = getattr(network, "architecture", {})
        self.compiled = torch.compile(network, options={"freezing": True})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = x.shape[0]
        batch = torch.cat([x, x]) if count == 1 else x  # a copy: a stride-0 batch would compile again
        torch._dynamo.mark_dynamic(batch, 0)  # only the batch size varies
        try:
            # A new tile shape compiles anew with static sizes: made dynamic (the compiler's default
            # after a shape change), the padding arithmetic of the forward pass fails to compile.
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                return self.compiled(batch)[:count]
        except torch._dynamo.exc.BackendCompilerFailed as error:
            reason = " ".join(line.strip() for line in str(error).splitlines()[:2])[:400]
            raise UserError(f"COMPILE: torch.compile could not compile the network here ({reason}); it needs a C++ "
                            "compiler (CPU) or Triton (GPU). Run without COMPILE.") from error


# One compiled network per trained model and device: restoring block after block (or both
# orientations) reuses the compilation instead of paying for it again.
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, Dict[str, nn.Module]]" = weakref.WeakKeyDictionary()


def compile_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with BatchNorm folded, channels-last on ``device`` and compiled
    by ``torch.compile`` (inductor, weights frozen as constants, dynamic batch
    size; :class:`CompiledNetwork`).

    The compilation happens on the first call for each tile shape (tens of
    seconds on 2 CPU cores) and is cached for ``model``; the outputs equal those
    of :func:`fuse_for_inference` up to float rounding. It pays when the volume
    is large enough for the faster forward pass to make up for the compilation
    (docs/speed.md).
    """
    cached = _COMPILED.setdefault(model, {})
    if str(device) not in cached:
        network = fuse_for_inference(model).to(device, memory_format=torch.channels_last).eval()
        cached[str(device)] = CompiledNetwork(network)
    return cached[str(device)]


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) under which it still has bfloat16 kernels.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                    "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")
ONEDNN_NO_CAP = ("ALL", "DEFAULT", "")  # the values of ONEDNN_MAX_CPU_ISA that leave oneDNN every instruction


def onednn_isa_cap() -> str:
    """oneDNN's cap on the instruction set, upper-case: ``ONEDNN_MAX_CPU_ISA`` (or its older name
    ``DNNL_MAX_CPU_ISA``), 'ALL' when neither is set. Read here and by ``machine.isa_class``, so that
    the precision chosen and the machine class reported see the same cap."""
    import os

    return os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()


def cpu_has_bf16_hardware() -> bool:
    """True where the CPU has bfloat16 instructions (AVX512-BF16 or AMX), whatever caps torch and oneDNN."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_computes_bf16() -> bool:
    """True where this CPU computes bfloat16 natively (AVX512-BF16 or AMX) *and* torch may use it:
    a cap on the instruction set (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, as set to emulate an
    older CPU) counts, so an emulated AVX2 machine chooses float32 as a real one does."""
    hardware = cpu_has_bf16_hardware()
    onednn_cap = onednn_isa_cap()
    onednn_allows = onednn_cap in ONEDNN_NO_CAP or onednn_cap in ONEDNN_BF16_ISAS
    aten_allows = torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    return hardware and onednn_allows and aten_allows


def cpuinfo_field(name: str) -> Optional[str]:
    """The value of the first ``name`` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_is_amd() -> bool:
    """True on an AMD CPU (Linux: /proc/cpuinfo's vendor; Windows: the platform's processor string)."""
    import platform

    return "AuthenticAMD" in (cpuinfo_field("vendor_id") or platform.processor() or "")


def cpu_has_amx() -> bool:
    """True where this CPU has AMX tiles and oneDNN may use them (no cap on the instruction set below AMX)."""
    hardware = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    onednn_cap = onednn_isa_cap()
    return hardware and (onednn_cap in ONEDNN_NO_CAP or "AMX" in onednn_cap) and cpu_computes_bf16()


def cpu_prefers_bf16() -> bool:
    """True where bfloat16 is the faster arithmetic on this CPU, as measured natively (docs/speed-by-machine.md):
    AMX (Intel Sapphire Rapids and later), and AVX512-BF16 on AMD (measured on Zen 4: the everyday job 1.64x faster
    than in float32; later AMD parts assumed to follow). Not Intel's AVX512-BF16 without AMX, measured on a Xeon:
    the same job 1.36x slower than in float32."""
    return cpu_has_amx() or (cpu_computes_bf16() and cpu_is_amd())


def precision_reason(precision: str, device: torch.device, kind: str = "mask") -> str:
    """Why :func:`resolve_precision` chooses what it does, in the plan's words; for ``kind`` 'intensity' on an
    AMD CPU, what float32 gave grey values there."""
    if precision in ("fp32", "bf16"):
        return f"--precision {precision}"
    if device.type == "cuda":
        return "auto: this GPU computes bfloat16 natively" if torch.cuda.is_bf16_supported() else \
            "auto: this GPU has no native bfloat16"
    if cpu_has_amx():
        return "auto: AMX, where bfloat16 is the faster arithmetic; --precision fp32 for float32"
    if cpu_prefers_bf16():
        # Measured side by side on a Zen 4 (docs/speed-by-machine.md): masks and label images scored the same in both
        # (IoU within 0.0006), grey values 0.15 dB PSNR higher in float32.
        return ("auto: AVX512-BF16 on an AMD CPU, where bfloat16 is the faster arithmetic; --precision fp32 for float32"
                + ("; on an AMD Zen 4 grey values scored 0.15 dB PSNR higher in float32" if kind == "intensity" else ""))
    if cpu_computes_bf16():
        return "auto: bfloat16 is not faster on an Intel CPU without AMX"
    if cpu_has_bf16_hardware():
        return "auto: this CPU's bfloat16 is capped off (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY)"
    return "auto: this CPU has no bfloat16 arithmetic"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``PRECISION``: 'auto' is bfloat16 where it is the faster arithmetic (AMX CPUs and
    AMD CPUs with AVX512-BF16, :func:`cpu_prefers_bf16`; GPUs that compute it natively, Ampere and later), else float32."""
    if precision not in PRECISIONS:
        raise UserError(f"PRECISION must be one of {PRECISIONS}, got '{precision}'.")
    if precision == "fp32":
        return torch.float32
    faster = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_prefers_bf16()
    if precision == "bf16" or faster:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Mixed-precision context for ``dtype`` (a no-op for float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def select_device(device: Optional[str] = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU; one clear error for a device
    that is no device name or that this machine does not have."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    named = f"Device '{device}' (--device, or device= from Python)"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserError(f"{named} is not a device: use cpu, cuda or cuda:N (or leave it out: CUDA "
                        "when available, else the CPU).") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{named}: this machine has no CUDA GPU that torch can use (torch "
                        f"{torch.__version__}). Leave the device out to run on the CPU.")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise UserError(f"{named}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0.")
    if chosen.type not in ("cpu", "cuda"):
        raise UserError(f"{named}: only cpu and cuda are supported.")
    return chosen


def save_model(path: Union[str, Path], model: AttentionResUNet, config: Optional[Mapping[str, Any]] = None,
               overwrite: bool = False) -> Path:
    """Save weights, architecture and training config (factor, TRAIN_Z_SIZE,
    tile size, ...) in one file that :func:`load_model` restores.

    ``config`` is saved over the model's own ``config``, which ``restore.train_on_stack`` and
    :func:`load_model` attach (``restore.trained_config``: the recipe the training used, fitted to its stack,
    and the factor): leave it out to save that record."""
    if config is not None and not isinstance(config, Mapping):
        raise UserError(f"save_model's config is a mapping of the recorded recipe (restore.trained_config), got "
                        f"{type(config).__name__}: leave it out to save the record the training attached to the model.")
    config = {**(getattr(model, "config", None) or {}), **(config or {})}
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"Model file '{path}' already exists; choose another path or pass overwrite=True.")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with writing_to(path):  # a full disk is one error, and no partial file is left to be loaded later
        torch.save({"format": "axial-sr-model/1", "architecture": model.architecture, "config": dict(config),
                    "state_dict": state}, path)
    return path


def load_model(path: Union[str, Path], device: Optional[str] = None) -> Tuple[AttentionResUNet, Dict[str, Any]]:
    """Load a model saved by :func:`save_model`, in eval mode, and its config (also attached as
    ``model.config``: a restore given the model and no settings restores with what it records)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Model file '{path}' does not exist. Train one with eval.py or apply.py --save-model.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises assorted errors for files it cannot parse
        raise UserError(f"'{path}' is not a model saved by this project (save_model): {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "axial-sr-model/1":
        raise UserError(f"'{path}' is not a model saved by this project (save_model).")
    model = AttentionResUNet(**{**PREVIOUS_NETWORK, **checkpoint["architecture"]})
    model.load_state_dict(checkpoint["state_dict"])
    model.to(select_device(device)).eval()
    model.config = dict(checkpoint["config"])  # what a restore checks the factor against, and saves again
    return model, checkpoint["config"]


# --------------------------------------------------------------------------- #
# The starting point of a mask training (built by starting_model.py)
# --------------------------------------------------------------------------- #
STARTING_MODEL_PATH = Path(__file__).resolve().parent / "models" / "phantom-mask.pt"
START_FROM_CHOICES = ("phantom", "scratch")


@functools.lru_cache(maxsize=2)
def _starting_model(path: str, modified_ns: int) -> AttentionResUNet:
    """The starting model file, read once per file version: a run asks several times whether it fits
    (the recipe's epochs, the plan, the training); callers get copies of its weights, never the model.

    Building the network draws its initial weights from torch's generator; that is done on a fork of it,
    so that whether the file was read before or after a training seeded the generator (a cold or a warm
    cache) does not change the training's random stream: the same run gives the same result.
    """
    with torch.random.fork_rng(devices=[]):
        return load_model(path, device="cpu")[0]


def starting_weights(architecture: Dict[str, Any], kind: str, start_from: str = "phantom",
                     path: Union[str, Path] = STARTING_MODEL_PATH) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """The weights a training of ``architecture`` starts from, and why.

    Parameters
    ----------
    architecture : dict
        ``AttentionResUNet.architecture`` of the network about to be trained.
    kind : {'mask', 'intensity'}
    start_from : {'phantom', 'scratch'}
        'phantom': the phantom-trained model at ``path`` where it has the same network and the stack is a
        mask (or a label image's foreground); 'scratch': random weights.
    path : str or Path
        The starting model file.

    Returns
    -------
    state_dict : dict of tensors (a copy), or None for random weights
    reason : str, one line for the plan and the log
    """
    if start_from not in START_FROM_CHOICES:
        raise UserError(f"START_FROM must be one of {START_FROM_CHOICES}, got '{start_from}'.")
    if start_from == "scratch":
        return None, "random weights (START_FROM scratch)"
    if kind != "mask":
        return None, "random weights (grey values: the starting model is for masks and label images)"
    path = Path(path)
    if not path.is_file():
        return None, f"random weights (no starting model at {path})"
    prior = _starting_model(str(path), path.stat().st_mtime_ns)
    # Dropout is a training choice, not part of the weights: any rate fine-tunes the same starting point.
    different = [f"{name} {prior.architecture.get(name)}, not {value}"
                 for name, value in architecture.items() if name != "dropout_rate" and prior.architecture.get(name) != value]
    if different:
        return None, f"random weights (the starting model has {', '.join(different)})"
    return {name: value.clone() for name, value in prior.state_dict().items()}, \
        f"the phantom-trained starting model ({path.name}), fine-tuned"
