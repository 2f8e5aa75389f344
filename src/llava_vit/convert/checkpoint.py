"""Checkpoint conversion: timm-source files and HF LlavaViT / OneVision-Encoder folders to the
packed layout (docs/ARCHITECTURE.md, "Checkpoint layouts"), with strict key and shape accounting
and the source's norm epsilons.

Loading is always ``weights_only``: a pickle that needs code to load is refused.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..model.configuration import LlavaViTConfig, LlavaViTPackingConfig
from ..model.modeling import LlavaViTPackingModel
from ..reference import LlavaViT, LlavaViTModel
from ..model.variants import SOURCE_EPS, VARIANTS

ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "patch_size", "layer_norm_type", "use_head", "rope_theta", "image_size")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
PROGRESS_MIN_BYTES = 256 * 2**20
"""Files at least this large show a progress bar while they are read."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly; the message says which keys or fields."""


def already_packed_error(what: str) -> ConversionError:
    """The refusal of a checkpoint that is already in the packed layout."""
    return ConversionError(
        f"{what} is already in the packed layout (patch_embed.proj.weight): load it with "
        f"LlavaViTPackingModel.from_pretrained instead of converting it"
    )


def ambiguous_architecture_error(shapes: dict[str, Any], reason: str) -> ConversionError:
    """The refusal of a checkpoint whose head count nothing decides (``reason`` says what was missing)."""
    return ConversionError(
        f"ambiguous architecture: the head count is in no tensor shape, these shapes (hidden_size="
        f"{shapes['hidden_size']}, layers={shapes['num_hidden_layers']}, intermediate_size="
        f"{shapes['intermediate_size']}, patch_size={shapes['patch_size']}) match no known variant, and {reason}; "
        f"give num_attention_heads: a config in Python, or on the command line --config FILE.json with e.g. "
        f'{{"num_attention_heads": {max(1, shapes["hidden_size"] // 64)}}}'
    )


# ---- reading ----------------------------------------------------------------------------------


class _ProgressFile(io.FileIO):
    """A file opened for reading that moves ``bar`` to its read position (``torch.load`` reads with ``readinto``)."""

    def __init__(self, path: Path, bar: tqdm):
        super().__init__(path, "rb")
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self._bar.update(self.tell() - self._bar.n)
        return data

    def readinto(self, buffer) -> int | None:
        count = super().readinto(buffer)
        self._bar.update(self.tell() - self._bar.n)
        return count


def _weights_only_reason(err: pickle.UnpicklingError) -> str:
    """PyTorch's specific reason (e.g. the blocked global), without its advice to turn ``weights_only`` off."""
    match = re.search(r"(?:Trying to load u|U)nsupported [^\n]*", str(err))
    return match.group(0).split(". Please")[0].rstrip(".") if match else "not a plain state dict"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt/.pth/.bin/.safetensors`` file; ``{"model": sd}``/``{"state_dict": sd}`` unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    quiet = path.stat().st_size < PROGRESS_MIN_BYTES
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in tqdm(f.keys(), desc=f"reading {path.name}", disable=quiet)}
        except Exception as err:
            raise ConversionError(f"{path} is not a readable safetensors file: {err}") from err
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic == b"PK\x03\x04" or magic[:1] == b"\x80"):  # torch.save's zip archive, or a binary pickle
        raise ConversionError(f"{path} is not a PyTorch checkpoint: it is neither a torch.save zip archive nor a pickle")
    try:
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                  disable=quiet) as bar, _ProgressFile(path, bar) as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed"):
            raise ConversionError(
                f"{path} refused: loading it would execute code or build objects beyond plain tensors "
                f"(torch.load weights_only=True rejected it: {_weights_only_reason(err)}). Only plain state dicts "
                f"are accepted; re-save the weights with torch.save(model.state_dict()) or as safetensors."
            ) from err
        raise ConversionError(f"{path} is not a PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(
            f"{path} does not hold a state dict (a mapping of names to tensors, bare or under 'model'/'state_dict')"
        )
    return dict(obj)


def read_hf_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights of an HF folder (single file, ``.bin``, or sharded with an index)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} is not an HF model folder: it has no config.json")
    config = json.loads(config_path.read_text())
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_state_dict_file(folder / shard))
            return config, state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return config, load_state_dict_file(folder / name)
    raise ConversionError(f"{folder} has no model.safetensors, pytorch_model.bin or shard index")


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """``"timm_source"``, ``"hf"`` or ``"packing"`` from the parameter names."""
    if "conv1.weight" in state:
        return "timm_source"
    if "embeddings.patch_embedding.weight" in state:
        return "hf"
    if "patch_embed.proj.weight" in state:
        return "packing"
    raise ConversionError(
        "unrecognised checkpoint: expected 'conv1.weight' (timm source), 'embeddings.patch_embedding.weight' "
        f"(HF LlavaViT/OneVision-Encoder) or 'patch_embed.proj.weight' (packing); first keys: {sorted(state)[:8]}"
    )


# ---- architecture -----------------------------------------------------------------------------


def infer_architecture(state: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, Any], str]:
    """Architecture fields the tensor shapes decide, and how the head count was found.

    The head count is not in any shape: it comes from a known variant with these shapes, or the
    caller must give it (a :class:`ConversionError` otherwise).
    """
    names = {
        "timm_source": ("conv1.weight", r"transformer\.layers\.(\d+)\.", "transformer.layers.0.mlp.0.weight",
                        "ln_pre.bias"),
        "hf": ("embeddings.patch_embedding.weight", r"encoder\.layers\.(\d+)\.", "encoder.layers.0.mlp.fc1.weight",
               "layernorm_pre.bias"),
        "packing": ("patch_embed.proj.weight", r"encoder\.layers\.(\d+)\.", "encoder.layers.0.mlp.fc1.weight",
                    "layernorm_pre.bias"),
    }[layout]
    patch_key, layer_re, fc1_key, pre_bias_key = names
    if patch_key not in state or fc1_key not in state:
        missing = [k for k in (patch_key, fc1_key) if k not in state]
        raise ConversionError(f"cannot read the architecture: missing {missing}")
    hidden, channels, patch, _ = state[patch_key].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(layer_re, k))}
    arch = dict(
        hidden_size=hidden, num_channels=channels, patch_size=patch,
        num_hidden_layers=max(layers) + 1, intermediate_size=state[fc1_key].shape[0],
        layer_norm_type="layer_norm" if pre_bias_key in state else "rms_norm",
        use_head=any(k.startswith("head.") for k in state),
    )
    for size, variant in VARIANTS.items():
        if all(variant[k] == arch[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size")):
            return {**arch, "num_attention_heads": variant["num_attention_heads"]}, f"shapes match the '{size}' variant"
    return arch, "ambiguous"


_READ_FROM_SHAPES = ("hidden_size", "num_channels", "patch_size", "num_hidden_layers", "intermediate_size",
                     "layer_norm_type", "use_head")
"""The fields :func:`infer_architecture` reads from tensors; the head count it only guesses."""


def _resolve_architecture(state, layout, config) -> tuple[dict[str, Any], str]:
    shapes, how = infer_architecture(state, layout)
    if config is not None:
        given = {k: getattr(config, k) for k in ARCH_FIELDS if hasattr(config, k)}
        clash = {k: (given[k], shapes[k]) for k in _READ_FROM_SHAPES if k in given and given[k] != shapes[k]}
        if clash:
            raise ConversionError(
                "the given config does not match the checkpoint's shapes: "
                + ", ".join(f"{k}: config {c} vs checkpoint {s}" for k, (c, s) in clash.items())
            )
        return {**shapes, **given}, "the given config"
    if how == "ambiguous":
        raise ambiguous_architecture_error(shapes, "no config was given")
    return shapes, how


# ---- key mapping --------------------------------------------------------------------------------

_TIMM_PACKING_NAMES = (
    ("conv1.weight", "patch_embed.proj.weight"),
    ("ln_pre.", "layernorm_pre."),
    ("ln_post.", "layernorm_post."),
    ("transformer.layers.{i}.ln_1.", "encoder.layers.{i}.layer_norm1."),
    ("transformer.layers.{i}.ln_2.", "encoder.layers.{i}.layer_norm2."),
    ("transformer.layers.{i}.attn.in_proj.", "encoder.layers.{i}.self_attn.qkv."),
    ("transformer.layers.{i}.attn.out_proj.", "encoder.layers.{i}.self_attn.proj."),
    ("transformer.layers.{i}.mlp.0.", "encoder.layers.{i}.mlp.fc1."),
    ("transformer.layers.{i}.mlp.2.", "encoder.layers.{i}.mlp.fc2."),
    ("head.", "head."),
)
"""timm-source name prefix -> packed name prefix (``{i}`` is the layer index): a pure renaming."""


def _prefix_rules(pairs, reverse: bool = False) -> tuple[tuple[str, str], ...]:
    """Regex rules renaming the prefixes of ``pairs`` (left to right, or right to left)."""
    rules = []
    for old, new in pairs:
        old, new = (new, old) if reverse else (old, new)
        rules.append(("^" + re.escape(old).replace(r"\{i\}", r"(\d+)"), new.replace("{i}", r"\1")))
    return tuple(rules)


_TIMM_TO_PACKING = _prefix_rules(_TIMM_PACKING_NAMES)
_PACKING_TO_TIMM = _prefix_rules(_TIMM_PACKING_NAMES, reverse=True)
_HF_TO_PACKING = (
    (r"^embeddings\.patch_embedding\.weight$", "patch_embed.proj.weight"),
    (r"^(layernorm_pre|layernorm_post)\.", r"\1."),
    (r"^encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.", r"encoder.layers.\1.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layers.\1.self_attn.proj."),
    (r"^(head\..*)$", r"\1"),
)
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _rename(state: dict[str, torch.Tensor], rules, what: str) -> dict[str, torch.Tensor]:
    """Apply the first matching regex rule to every key; a key no rule matches is an error."""
    out, unknown = {}, []
    for key, tensor in state.items():
        for pattern, repl in rules:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{len(unknown)} {what}: {sorted(unknown)}")
    return out


def to_packing_state_dict(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename (and for HF, fuse q/k/v into ``qkv``) every tensor; unknown keys are an error."""
    if layout == "packing":
        return dict(state)
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in state.items():
        if layout == "hf" and (m := _HF_QKV.match(key)):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = tensor
        else:
            rest[key] = tensor
    rules = _TIMM_TO_PACKING if layout == "timm_source" else _HF_TO_PACKING
    out = _rename(rest, rules, "checkpoint tensors have no place in the model")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = [f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv" if p not in parts]
            raise ConversionError(f"incomplete attention projections: missing {missing}")
        out[f"encoder.layers.{layer}.self_attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_timm_source_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed-layout tensors renamed to the timm source layout (the inverse of
    ``to_packing_state_dict(state, "timm_source")``); tensors are shared, not copied."""
    return _rename(state, _PACKING_TO_TIMM, "packed tensors have no place in the timm source layout")


def check_state_dict_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Every model tensor filled, every checkpoint tensor used, every shape equal; else list the keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if wrong:
        problems.append(f"wrong shapes {wrong}")
    if problems:
        raise ConversionError(f"{what} does not match the model: " + "; ".join(problems))


# ---- public entry points -------------------------------------------------------------------------


def read_checkpoint(src: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """``(state, layout, hf_config)`` of a checkpoint file or HF folder."""
    src = Path(src)
    if src.is_dir():
        hf_config, state = read_hf_folder(src)
        return state, detect_layout(state), hf_config
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if src.suffix not in CHECKPOINT_SUFFIXES:
        raise ConversionError(f"{src}: expected a {'/'.join(CHECKPOINT_SUFFIXES)} file or an HF folder")
    state = load_state_dict_file(src)
    return state, detect_layout(state), None


def packing_config_for(
    state, layout: str, hf_config: dict | None, config=None
) -> tuple[LlavaViTPackingConfig, str, str]:
    """The packed config for a checkpoint, with the epsilons its source used; and where the
    architecture and the epsilons came from (for reports).

    timm source: the source's epsilons whatever ``config`` says (it supplies the architecture only).
    HF folder: its ``config.json`` (``layer_norm_eps`` for every norm, head included).
    HF-layout weights without a ``config.json``: ``config``'s epsilons, else the HF default 1e-6.
    """
    if hf_config is not None and config is None:
        try:
            config = LlavaViTConfig(**{k: v for k, v in hf_config.items() if k in ARCH_FIELDS + ("layer_norm_eps", "hidden_act")})
        except (TypeError, ValueError) as err:
            raise ConversionError(f"the folder's config.json: {err}") from err
        arch, _ = _resolve_architecture(state, layout, config)
        arch_from = "the folder's config.json"
    else:
        arch, arch_from = _resolve_architecture(state, layout, config)
    if layout == "timm_source":
        eps, eps_from = SOURCE_EPS[arch["layer_norm_type"]], "the timm source's PyTorch defaults"
    elif hf_config is not None:
        value = hf_config.get("layer_norm_eps", 1e-6)
        eps, eps_from = dict(layer_norm_eps=value, head_norm_eps=value), "the folder's config.json"
    elif config is not None:
        eps = dict(layer_norm_eps=config.layer_norm_eps, head_norm_eps=config.head_norm_eps)
        eps_from = "the given config (HF-layout weights without a config.json)"
    else:
        eps, eps_from = {}, "HF default (HF-layout weights without a config.json)"
    return LlavaViTPackingConfig(**{**arch, **eps}), arch_from, eps_from


@dataclass
class Conversion:
    """A checkpoint in the packed layout: the model (holding the checkpoint's tensors, not copies)
    and where its architecture and norm epsilons came from."""

    model: LlavaViTPackingModel
    architecture_from: str
    eps_from: str


def convert_state_dict(
    state: dict[str, torch.Tensor], layout: str, hf_config: dict | None = None, config=None, *, what: str = "checkpoint"
) -> Conversion:
    """The packed model holding ``state``'s tensors, with where its architecture and epsilons came from.

    ``state``, ``layout`` and ``hf_config`` are what :func:`read_checkpoint` returns; ``what``
    names the checkpoint in errors.
    """
    if layout == "packing":
        raise already_packed_error(what)
    packing_config, arch_from, eps_from = packing_config_for(state, layout, hf_config, config)
    packed = to_packing_state_dict(state, layout)
    with torch.device("meta"):
        model = LlavaViTPackingModel(packing_config)
    check_state_dict_matches(model, packed, what)
    model.load_state_dict(packed, strict=True, assign=True)
    return Conversion(model.eval(), arch_from, eps_from)


def convert_checkpoint(src: str | Path, *, config: LlavaViTPackingConfig | LlavaViTConfig | None = None) -> LlavaViTPackingModel:
    """Build a :class:`LlavaViTPackingModel` from a timm-source file or an HF LlavaViT/OneVision-Encoder folder.

    ``config`` gives the architecture where the file cannot (the head count of an unknown size).
    Weights keep the checkpoint's dtype and are not copied (the model takes the loaded tensors).
    """
    state, layout, hf_config = read_checkpoint(src)
    return convert_state_dict(state, layout, hf_config, config, what=f"checkpoint {src}").model


def source_model(
    state: dict[str, torch.Tensor], layout: str, config: LlavaViTPackingConfig, *, what: str = "checkpoint"
) -> LlavaViT | LlavaViTModel:
    """The source model holding ``state`` (timm :class:`LlavaViT` or HF :class:`LlavaViTModel`), for verification.

    ``config`` is the checkpoint's packed config (from :func:`packing_config_for`, or the
    converted model's), so both models compute with the same architecture and epsilons. The
    parameters are ``state``'s tensors upcast to float32 (no copy when they already are).
    """
    if layout not in ("timm_source", "hf"):
        raise ConversionError(f"{what}: a {layout} checkpoint has no separate source model")
    fields = {k: getattr(config, k) for k in ARCH_FIELDS + ("layer_norm_eps", "head_norm_eps")}
    with torch.device("meta"):
        model = (LlavaViT if layout == "timm_source" else LlavaViTModel)(LlavaViTConfig(**fields))
    check_state_dict_matches(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


def build_source_model(src: str | Path, *, config: LlavaViTPackingConfig | LlavaViTConfig | None = None):
    """The source model of a checkpoint file or folder (see :func:`source_model`)."""
    state, layout, hf_config = read_checkpoint(src)
    packing_config, _, _ = packing_config_for(state, layout, hf_config, config)
    return source_model(state, layout, packing_config, what=f"checkpoint {src}")
