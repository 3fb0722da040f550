"""What every self-drafting head shares (eagle.py, medusa.py): the target's identity and token
embeddings as a backend holds them, and the head's folder (a JSON config + model.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

WEIGHTS_NAME = "model.safetensors"


def fingerprint(embed: Tensor) -> str:
    """A short identity of a target: its vocabulary and hidden size and a checksum of a few
    embedding rows (a head shares or reads these weights, so they must be the same)."""
    rows = embed[:: max(1, embed.shape[0] // 64)].float()
    return f"{embed.shape[0]}x{embed.shape[1]}:{float(rows.abs().sum()):.4e}:{float(rows.sum()):.4e}"


def refuse_other_target(cfg: Any, embed: Tensor, subject: str, target_name: str, fix: str) -> None:
    """Raise, naming both targets, when a head's config (cfg.target, cfg.target_fingerprint) was
    trained for another target than the one whose embeddings are `embed`. subject: what the head
    is and where ("the EAGLE head in 'DIR' was trained"); fix: what to do instead."""
    if cfg.target_fingerprint != fingerprint(embed):
        raise ValueError(f"{subject} for target {cfg.target!r}, not for {target_name!r} (their embeddings differ): {fix}")


def target_embedding(model: object) -> Tensor:
    """The (V, D_t) token embedding of a backend (native or transformers)."""
    embed = getattr(model, "embed", None)
    if isinstance(embed, Tensor):
        return embed
    hf = getattr(model, "model", None)
    if hf is not None and hasattr(hf, "get_input_embeddings"):
        return hf.get_input_embeddings().weight.detach()
    raise ValueError(f"cannot read the token embeddings of {type(model).__name__}: use backend 'native' or 'hf'")


def save_head(module: nn.Module, config_json: str, path: Path, config_name: str) -> None:
    """Write the weights (atomically: a killed run leaves the previous file) and the config."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    tmp.replace(path / WEIGHTS_NAME)
    (path / config_name).write_text(config_json + "\n")


def load_head(path: str | Path, config_name: str, what: str, method: str, build: Any,
              dtype: torch.dtype | None, device: torch.device | None) -> Any:
    """build(config text) -> module; its weights then come from the folder. Errors name the folder
    and say how to get a good one; `what` names the head in them ("an EAGLE head")."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / config_name).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{str(path)!r} is not {what} folder (needs {config_name} and {WEIGHTS_NAME}): train one "
            f"with `outrider train drafter --method {method}`"
        )
    try:
        module = build((path / config_name).read_text())
        module.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    except Exception as e:  # json, dataclass or safetensors errors: name the folder either way
        raise ValueError(f"the files in {str(path)!r} are unreadable as {what} ({e}): retrain or re-copy them") from e
    return module.to(device=device, dtype=dtype).eval()
