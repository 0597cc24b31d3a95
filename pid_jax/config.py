"""Network and preset configuration: frozen dataclasses built from the JSON files in `configs/`.

A preset JSON holds the upstream `PidNet(**kwargs)` arguments under `network` (upstream names, so a
released experiment config can be pasted in), plus what the decoder needs around the network: the
latent space, the sampler and its defaults (`SamplerSpec`) and the Hub location. A plain JSON of upstream
`PidNet` arguments (as in the parity fixtures) is accepted wherever a preset is.

A network config without any of PidNet's own (super-resolution) arguments is upstream's `PixDiT_T2I`, the
text-to-image backbone PidNet derives from: the same network without the adapter (`lq_proj`,
`pit_lq_gate`), with PixDiT_T2I's constructor defaults (`rope_mode="original"`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pid_jax.errors import ConfigError, InputError

GATE_TYPES = ("sigma_aware_per_token", "sigma_aware_per_token_per_dim")
PADDING_MODES = ("zeros", "replicate", "reflect")
ROPE_MODES = ("original", "ntk_aware")
STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
SAMPLER_KINDS = ("student", "dpmpp")
# Gemma-2-2b's hidden size: a network whose caption stream takes this width is conditioned on Gemma-2 captions,
# whose null caption is Gemma's encoding of "" (not zeros).
GEMMA_CAPTION_DIM = 2304
CAPTION_KINDS = ("gemma", "none")
# PidNet's arguments beyond its base class PixDiT_T2I (upstream `pid_net.py`); a config naming none is a PixDiT_T2I.
PIDNET_ONLY_ARGS = (
    "lq_inject_mode",
    "lq_in_channels",
    "lq_latent_channels",
    "lq_hidden_dim",
    "lq_num_res_blocks",
    "lq_latent_unpatchify_factor",
    "lq_aux_rgb_head",
    "lq_aux_rgb_head_latent_block_idx",
    "lq_conv_padding_mode",
    "lq_gate_type",
    "lq_interval",
    "zero_init_lq",
    "train_lq_proj_only",
    "sr_scale",
    "latent_spatial_down_factor",
    "pit_lq_inject",
)


@dataclass(frozen=True)
class PidNetConfig:
    """Upstream `PidNet` constructor arguments, with upstream defaults and names."""

    in_channels: int = 3
    num_groups: int = 16
    hidden_size: int = 1152
    pixel_hidden_size: int = 64
    pixel_attn_hidden_size: int | None = None
    pixel_num_groups: int | None = None
    patch_depth: int = 26
    pixel_depth: int = 2
    num_text_blocks: int = 4  # unused upstream (no text refine blocks are built)
    patch_size: int = 16
    txt_embed_dim: int = 4096
    txt_max_length: int = 1024
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    rope_mode: str = "ntk_aware"
    rope_ref_h: int = 1024
    rope_ref_w: int = 1024
    repa_encoder_index: int = -1  # training-only (REPA feature tap)
    enable_ed: bool = False
    ed_compress_ratio: int = 1
    ed_depth_per_stage: int = 1
    ed_window_size: int = 2
    ed_num_heads: int | None = None
    ed_hidden_size: int | None = None
    ed_use_token_shuffle: bool = True
    lq_inject_mode: str = "controlnet"
    lq_in_channels: int = 3
    lq_latent_channels: int = 0
    lq_hidden_dim: int = 512
    lq_num_res_blocks: int = 4
    lq_latent_unpatchify_factor: int = 1
    lq_aux_rgb_head: bool = False
    lq_aux_rgb_head_latent_block_idx: int = -1
    lq_conv_padding_mode: str = "zeros"
    lq_gate_type: str = "sigma_aware_per_token_per_dim"
    lq_interval: int = 1
    zero_init_lq: bool = True  # init-only
    train_lq_proj_only: bool = False  # training-only
    sr_scale: int = 4
    latent_spatial_down_factor: int = 8
    pit_lq_inject: bool = False
    # Not an upstream argument: True for upstream's PixDiT_T2I (the backbone alone), set by `pixdit_t2i`.
    is_text_to_image: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> PidNetConfig:
        """Upstream `PidNet` arguments, or `PixDiT_T2I` ones (no PidNet-only argument: no adapter)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"is_text_to_image"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown PidNet argument(s) {unknown}")
        if not set(d) & set(PIDNET_ONLY_ARGS):
            return cls.pixdit_t2i(**d)
        return cls(**d)

    @classmethod
    def pixdit_t2i(cls, **kwargs: Any) -> PidNetConfig:
        """Upstream `PixDiT_T2I(**kwargs)`: PidNet without the adapter, with PixDiT_T2I's defaults."""
        bad = sorted(set(kwargs) & set(PIDNET_ONLY_ARGS))
        if bad:
            raise ConfigError(f"PixDiT_T2I config: {bad} are PidNet (adapter) arguments")
        base = {"rope_mode": "original", "lq_in_channels": 0, "lq_latent_channels": 0}
        return cls(**{**base, **kwargs, "is_text_to_image": True})

    def to_dict(self) -> dict[str, Any]:
        """The upstream constructor's arguments: PidNet's, or PixDiT_T2I's for a text-to-image network."""
        d = dataclasses.asdict(self)
        d.pop("is_text_to_image")
        if self.is_text_to_image:
            for k in PIDNET_ONLY_ARGS:
                d.pop(k)
        return d

    def _validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"PidNet config: {msg}")

        if self.lq_inject_mode != "controlnet":
            raise bad(f"lq_inject_mode={self.lq_inject_mode!r} is not supported (expected 'controlnet')")
        if self.lq_in_channels != 0:
            raise bad(
                f"lq_in_channels={self.lq_in_channels}: the LQ image branch is used by no released checkpoint "
                "and is not implemented (expected 0)"
            )
        if self.enable_ed:
            raise bad("enable_ed=True: the encoder-decoder path is used by no released checkpoint (expected False)")
        if self.is_text_to_image:  # PixDiT_T2I: none of the adapter's switches may be on
            on = [k for k in ("lq_latent_channels", "pit_lq_inject", "lq_aux_rgb_head") if getattr(self, k)]
            if on:
                raise bad(f"a PixDiT_T2I (text to image, no adapter) has no {on}")
        elif self.lq_latent_channels <= 0:
            raise bad(f"lq_latent_channels={self.lq_latent_channels} (expected > 0: PiD decodes latents)")
        if self.lq_gate_type not in GATE_TYPES:
            raise bad(f"lq_gate_type={self.lq_gate_type!r} (expected one of {GATE_TYPES})")
        if self.lq_conv_padding_mode not in PADDING_MODES:
            raise bad(f"lq_conv_padding_mode={self.lq_conv_padding_mode!r} (expected one of {PADDING_MODES})")
        if self.rope_mode not in ROPE_MODES:
            raise bad(f"rope_mode={self.rope_mode!r} (expected one of {ROPE_MODES})")
        if self.hidden_size % self.num_groups:
            raise bad(f"hidden_size={self.hidden_size} not divisible by num_groups={self.num_groups}")
        if self.pixel_attn_dim % self.pixel_heads:
            raise bad(f"pixel_attn_hidden_size={self.pixel_attn_dim} not divisible by {self.pixel_heads} heads")
        if self.pixel_depth <= 0 or self.patch_depth <= 0:
            raise bad("patch_depth and pixel_depth must be > 0")
        if self.lq_interval <= 0:
            raise bad(f"lq_interval={self.lq_interval} (expected >= 1)")
        if self.is_text_to_image:
            return
        f = self.lq_latent_unpatchify_factor
        if f < 1 or self.latent_spatial_down_factor % f or self.lq_latent_channels % (f * f):
            raise bad(
                f"lq_latent_unpatchify_factor={f} must divide latent_spatial_down_factor="
                f"{self.latent_spatial_down_factor} and its square must divide lq_latent_channels="
                f"{self.lq_latent_channels}"
            )
        r = self.z_to_patch_ratio
        if r < 1 and (1 / r) != int(1 / r):
            raise bad(f"latent-to-patch ratio {r} is neither an integer upsample nor an integer fold")
        if self.lq_aux_rgb_head and self.patch_size % self.sr_scale:
            raise bad(f"aux RGB head needs patch_size % sr_scale == 0, got {self.patch_size}, {self.sr_scale}")

    # Derived quantities, named as upstream computes them.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_groups

    @property
    def pixel_attn_dim(self) -> int:
        return self.pixel_attn_hidden_size if self.pixel_attn_hidden_size is not None else self.hidden_size

    @property
    def pixel_heads(self) -> int:
        return self.pixel_num_groups if self.pixel_num_groups is not None else self.num_groups

    @property
    def num_lq_outputs(self) -> int:
        return (self.patch_depth + self.lq_interval - 1) // self.lq_interval

    @property
    def rope_ref_grid(self) -> tuple[int, int]:
        return self.rope_ref_h // self.patch_size, self.rope_ref_w // self.patch_size

    @property
    def effective_latent_down_factor(self) -> int:
        return self.latent_spatial_down_factor // self.lq_latent_unpatchify_factor

    @property
    def effective_latent_channels(self) -> int:
        return self.lq_latent_channels // self.lq_latent_unpatchify_factor**2

    @property
    def z_to_patch_ratio(self) -> float:
        return self.sr_scale * self.effective_latent_down_factor / self.patch_size

    @property
    def latent_fold_factor(self) -> int:
        r = self.z_to_patch_ratio
        return int(round(1 / r)) if r < 1 else 1

    @property
    def latent_proj_in_channels(self) -> int:
        return self.effective_latent_channels * self.latent_fold_factor**2

    @property
    def pixel_scale(self) -> int:
        """Output pixels per latent element along each axis."""
        return self.latent_spatial_down_factor * self.sr_scale

    @property
    def is_v1pt5(self) -> bool:
        return self.pit_lq_inject

    @property
    def gemma_captions(self) -> bool:
        """Whether the caption stream takes Gemma-2 embeddings' width (else no caption encoder can feed it)."""
        return self.txt_embed_dim == GEMMA_CAPTION_DIM


@dataclass(frozen=True)
class LatentSpec:
    channels: int
    vae_factor: int
    noising: str = "flow"  # "flow": (1-s) z + s eps;  "vp": sqrt(1-s^2) z + s eps (SDXL)
    description: str = ""


@dataclass(frozen=True)
class SamplerSpec:
    """How a preset's network is sampled, with the defaults every entry point uses.

    kind "student": the distilled few-step sampler over `t_list` (`mode` sde/ode, optional tiling).
    kind "dpmpp": upstream's multistep DPM-Solver++ (order 2, flow schedule) with classifier-free guidance,
    the sampler of the undistilled teachers and of PixelDiT (`pid_jax.teacher_sampler`): `steps` model
    evaluations, guidance `cfg_scale` against `negative_prompt` (encoded with the CHI prompt), and the flow
    shift `shift`, or when it is None the dynamic shift `dynamic_shift_base * sqrt(sqrt(H W) /
    dynamic_shift_size)` of the output image's H, W.
    """

    t_list: tuple[float, ...] = STUDENT_T_LIST
    steps: int = 4
    mode: str = "sde"
    # Output pixels: decode larger images as overlapping tiles of this size (a network trained at one size).
    tile: int | None = None
    tile_overlap: int = 0
    # Output pixels at each end of a tile that get (almost) no blend weight (`tiled_decode.ramp`).
    tile_margin: int = 0
    kind: str = "student"
    cfg_scale: float = 1.0
    shift: float | None = None
    dynamic_shift_base: float = 6.0
    dynamic_shift_size: int = 2048
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ConfigError(f"sampler.kind={self.kind!r} (expected one of {SAMPLER_KINDS})")
        if self.kind == "dpmpp":
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ConfigError(f"sampler.steps={self.steps!r} (expected a positive number of DPM-Solver++ steps)")
            if self.tile is not None:
                raise ConfigError("sampler.tile: tiled decoding is only for the student sampler")
            if not math.isfinite(self.cfg_scale):
                raise ConfigError(f"sampler.cfg_scale={self.cfg_scale!r} (expected a finite number)")
            if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
                raise ConfigError(f"sampler.shift={self.shift!r} (expected a positive number, or null: dynamic)")
            if not (self.dynamic_shift_base > 0 and self.dynamic_shift_size > 0):
                raise ConfigError("sampler.dynamic_shift_base and dynamic_shift_size must be positive")

    def shift_for(self, height: int, width: int, shift: float | None = None) -> float:
        """The flow shift of a dpmpp run at an output of height x width: `shift` (an override), the preset's
        fixed shift, else upstream's dynamic rule (Python double, as upstream)."""
        if shift is not None:
            return float(shift)
        if self.shift is not None:
            return float(self.shift)
        return self.dynamic_shift_base * math.sqrt(math.sqrt(height * width) / self.dynamic_shift_size)


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    filename: str


@dataclass(frozen=True)
class Preset:
    name: str
    network: PidNetConfig
    latent: LatentSpec
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    hub: HubSpec | None = None
    variant: str | None = None
    backbones: tuple[str, ...] = ()
    # "gemma": conditioned on captions (Gemma-2 embeddings, or embeddings of its width); "none": no caption to give
    # (pixel_sr4x was trained on the null caption only): decodes with zeros and refuses captions.
    captions: str = "gemma"

    def __post_init__(self) -> None:
        if self.captions not in CAPTION_KINDS:
            raise ConfigError(f"{self.name}: captions={self.captions!r} (expected one of {CAPTION_KINDS})")

    @property
    def takes_captions(self) -> bool:
        """False for a network trained without captions: it decodes with the null caption (zeros) by default."""
        return self.captions != "none"

    def caption_encoder_error(self, what: str = "captions", advice: str | None = None) -> InputError | None:
        """Why text captions (through a caption encoder) cannot reach this network, or None when they can; the
        refusal names what to do instead, and comes before any encoder is downloaded or loaded."""
        if not self.takes_captions:
            return InputError(
                f"{what}: preset {self.name} has no caption stream to feed (trained on the null caption only; "
                f"zeros [L, {self.network.txt_embed_dim}] are used when no caption is given): "
                f"{advice or f'drop {what}'}"
            )
        return None  # a width mismatch with the encoder given is found once its config is read

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "variant": self.variant, "backbones": list(self.backbones)}
        d["captions"] = self.captions
        d["network"] = self.network.to_dict()
        d["latent"] = dataclasses.asdict(self.latent)
        d["sampler"] = dataclasses.asdict(self.sampler)
        d["sampler"]["t_list"] = list(self.sampler.t_list)
        d["hub"] = dataclasses.asdict(self.hub) if self.hub else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Preset:
        if "network" not in d:
            # A plain JSON of upstream PidNet arguments: derive what the decoder needs.
            net = PidNetConfig.from_dict(d, source)
            # A PixDiT_T2I samples as the released PixelDiT does; a PidNet's arguments do not say whether it is a
            # distilled student or a teacher: the student's sampler, unless a preset says otherwise.
            sampler = load_preset("pixeldit_2kto4k").sampler if net.is_text_to_image else SamplerSpec()
            return cls(name=_name_from_source(source), network=net, latent=_default_latent(net), sampler=sampler)
        known = {"name", "network", "latent", "sampler", "hub", "variant", "backbones", "description", "captions"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown preset field(s) {unknown}")
        net = PidNetConfig.from_dict(d["network"], source)
        try:
            latent = LatentSpec(**d["latent"]) if d.get("latent") else _default_latent(net)
            s = dict(d.get("sampler") or {})
            if "t_list" in s:
                s["t_list"] = tuple(float(v) for v in s["t_list"])
            sampler = SamplerSpec(**s)
            hub = HubSpec(**d["hub"]) if d.get("hub") else None
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None
        if latent.channels != net.lq_latent_channels:
            raise ConfigError(
                f"{source}: latent.channels={latent.channels} != network lq_latent_channels={net.lq_latent_channels}"
            )
        if sampler.tile is not None:
            from pid_jax.tiled_decode import check_tiling

            try:
                check_tiling(sampler.tile, sampler.tile_overlap, net.pixel_scale, net.patch_size, sampler.tile_margin)
            except InputError as e:
                raise ConfigError(f"{source}: {e}") from None
        if latent.noising not in ("flow", "vp"):
            raise ConfigError(f"{source}: latent.noising={latent.noising!r} (expected 'flow' or 'vp')")
        return cls(
            name=d.get("name", _name_from_source(source)),
            network=net,
            latent=latent,
            sampler=sampler,
            hub=hub,
            variant=d.get("variant"),
            backbones=tuple(d.get("backbones", ())),
            captions=d.get("captions", "gemma"),
        )


def _default_latent(net: PidNetConfig) -> LatentSpec:
    if net.is_text_to_image:
        return LatentSpec(0, 1, description="none: a text-to-image network")
    return LatentSpec(net.lq_latent_channels, net.latent_spatial_down_factor)


def _name_from_source(source: str) -> str:
    p = Path(source)
    return p.parent.name if p.stem == "config" and p.parent.name else p.stem


def preset_names() -> list[str]:
    """Names of the presets shipped in the package (one per released checkpoint)."""
    root = resources.files("pid_jax.configs")
    names = (p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))
    return sorted(n for n in names if n not in _NON_PRESETS and not n.startswith("vae_"))  # vae_*: VAE configs


_NON_PRESETS = {"chi_prompt", "demo", "pixel_sr4x"}
# Shipped configurations that are not released checkpoints (no Hub file), loadable by name all the same:
# pixel_sr4x with its trained weights in the package (pid_jax.shipped), demo a layout for random weights.
LOCAL_PRESETS = ("pixel_sr4x", "demo")


def local_preset_names() -> list[str]:
    """Presets shipped with the package that are not NVIDIA releases (pixel_sr4x has shipped weights)."""
    return list(LOCAL_PRESETS)


def load_preset(name: str) -> Preset:
    if name not in preset_names() and name not in LOCAL_PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}; presets: {', '.join(preset_names())}; "
            f"shipped with pid-jax: {', '.join(LOCAL_PRESETS)}"
        )
    text = resources.files("pid_jax.configs").joinpath(f"{name}.json").read_text()
    return Preset.from_dict(json.loads(text), source=f"{name}.json")


def load_config(spec: str | Path | dict | Preset) -> Preset:
    """Resolve a preset name, a preset JSON file, a plain upstream-argument JSON file, or a dict."""
    if isinstance(spec, Preset):
        return spec
    if isinstance(spec, dict):
        return Preset.from_dict(spec)
    s = str(spec)
    p = Path(s)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {s} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{s}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{s}: expected a JSON object")
        return Preset.from_dict(d, source=s)
    return load_preset(s)
