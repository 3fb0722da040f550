"""`outrider bench serve`: a load generator for any OpenAI-compatible server.

Spec-Bench questions (first turns) are sent as streamed requests, either at a fixed concurrency
(each of C clients sends its next request when the last one ends) or as Poisson arrivals at a rate.
Per request it times TTFT (send -> first text), TPOT ((e2e - TTFT) / (tokens - 1)) and the
end-to-end latency; tokens are counted from `usage` (stream_options.include_usage), since with
speculation one chunk may carry several accepted tokens. Goodput counts the requests per second
that met every stated SLO (vLLM's definition). Several servers (`--url spec=... --url off=...`)
are measured in one run, alternating at each load level, so that they see the same machine state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from outrider.bench.datasets import load_spec_bench

DEFAULT_DATASET = "../shared/data/spec_bench/question.jsonl"
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None  # "HTTP 429", "ReadTimeout", ... (None when ok)
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0  # from usage: committed tokens
    tau: float | None = None  # outrider's per-request figures, when the server sends them
    drafted: int = 0
    accepted: int = 0

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Target:
    label: str
    url: str  # the server's base URL, without /v1


@dataclass(frozen=True)
class SLO:
    """Limits a request must meet to count toward goodput (None: not a limit)."""

    ttft_ms: float | None = 1000.0
    tpot_ms: float | None = 100.0
    e2e_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s), (self.e2e_ms, r.e2e_s))
        return all(limit is None or value is None or value * 1000 <= limit for limit, value in checks)


@dataclass
class LoadConfig:
    targets: list[Target]
    prompts: list[str]
    concurrency: list[int] = field(default_factory=lambda: [1])
    rate: float | None = None  # requests/s (Poisson); replaces concurrency when set
    max_tokens: int = 128
    temperature: float = 0.0
    endpoint: str = "completions"  # or "chat"
    model: str | None = None  # None: the first id of GET /v1/models
    slo: SLO = field(default_factory=SLO)
    timeout_s: float = 600.0
    seed: int = 0
    warmup: int = 1  # requests per server before measuring (not counted)


def parse_target(text: str) -> Target:
    """`URL` or `label=URL`; the URL is the server's base (a trailing /v1 is dropped)."""
    label, sep, url = text.partition("=")
    if not sep:
        label, url = text, text
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"--url {text!r} is not an http(s) URL: use e.g. http://127.0.0.1:8000 "
                                         "or spec=http://127.0.0.1:8000")
    return Target(label, url)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency {text!r} is not a comma-separated list of integers")
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency {text!r} is invalid: use integers >= 1, e.g. 1,2,4")
    return levels


def load_prompts(dataset: str | Path, num_prompts: int) -> list[str]:
    """The first turn of each question, in file order, repeated until there are num_prompts."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts {num_prompts} is invalid: use an integer >= 1")
    turns = [q.turns[0] for q in load_spec_bench(dataset)]
    return [turns[i % len(turns)] for i in range(num_prompts)]


def _body(cfg: LoadConfig, model: str, prompt: str) -> tuple[str, dict[str, Any]]:
    common = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "stream": True,
              "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    # The plain template of bench.datasets.render_prompt, for models without a chat template.
    return "/v1/completions", {**common, "prompt": f"User: {prompt}\nAssistant:"}


async def send(client: Any, cfg: LoadConfig, target: Target, model: str, prompt: str) -> RequestResult:
    """One streamed request, timed from just before it is sent."""
    import httpx

    path, body = _body(cfg, model, prompt)
    t0 = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", target.url + path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(ok=False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {obj['error'].get('message', '')[:80]}"
                    continue
                for choice in obj.get("choices") or []:
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text and result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - t0
                if obj.get("usage"):
                    result.prompt_tokens = obj["usage"]["prompt_tokens"]
                    result.output_tokens = obj["usage"]["completion_tokens"]
                if obj.get("outrider"):
                    figures = obj["outrider"]
                    result.tau = figures.get("tau")
                    result.drafted, result.accepted = figures.get("drafted", 0), figures.get("accepted", 0)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(ok=False, error=type(e).__name__)
    result.e2e_s = time.perf_counter() - t0
    if result.ok and result.ttft_s is None:
        result.ttft_s = result.e2e_s  # no text at all (e.g. an immediate EOS)
    if not result.ok and result.error is None:
        result.error = "stream ended without [DONE]"
    return result


async def run_level(cfg: LoadConfig, target: Target, model: str, concurrency: int | None
                    ) -> tuple[list[RequestResult], float]:
    """All prompts against one server at one load; returns the results and the wall time."""
    import httpx

    limit = concurrency or len(cfg.prompts)
    async with httpx.AsyncClient(timeout=cfg.timeout_s, limits=httpx.Limits(max_connections=limit)) as client:
        for prompt in cfg.prompts[: cfg.warmup]:
            await send(client, cfg, target, model, prompt)
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(cfg.prompts))
            results: list[RequestResult] = []

            async def worker() -> None:
                while queue:
                    results.append(await send(client, cfg, target, model, queue.pop()))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(cfg.seed)  # the same arrival times for every server
            tasks = []
            for prompt in cfg.prompts:
                tasks.append(asyncio.ensure_future(send(client, cfg, target, model, prompt)))
                await asyncio.sleep(rng.expovariate(cfg.rate))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def _percentiles(values: Sequence[float | None]) -> dict[str, float | None]:
    xs = [v * 1000 for v in values if v is not None]
    return {f"p{p}": float(np.percentile(xs, p)) if xs else None for p in PERCENTILES}


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
    taus = [r.tau for r in ok if r.tau is not None]
    drafted = sum(r.drafted for r in ok)
    per_request = [r.output_tokens / r.e2e_s for r in ok if r.e2e_s]
    return {
        "requests": len(results), "ok": len(ok), "errors": errors, "duration_s": duration_s,
        "ttft_ms": _percentiles([r.ttft_s for r in ok]),
        "tpot_ms": _percentiles([r.tpot_s for r in ok]),
        "e2e_ms": _percentiles([r.e2e_s for r in ok]),
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s if duration_s > 0 else 0.0,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else 0.0,
        "goodput_requests_per_s": sum(slo.met(r) for r in results) / duration_s if duration_s > 0 else 0.0,
        "per_request_tokens_per_s": float(np.mean(per_request)) if per_request else None,
        "mean_tau": sum(taus) / len(taus) if taus else None,
        "alpha": sum(r.accepted for r in ok) / drafted if drafted else None,
    }


async def _model_id(target: Target, timeout_s: float) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        try:
            response = await client.get(target.url + "/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{target.url}/v1/models did not list a model ({type(e).__name__}: {e}): is the "
                             "server up? pass --model to skip this look-up") from e


async def run_load(cfg: LoadConfig) -> list[dict[str, Any]]:
    """Every load level against every server (servers alternate within a level)."""
    models = {t: cfg.model or await _model_id(t, cfg.timeout_s) for t in cfg.targets}
    rows = []
    for level in ([None] if cfg.rate is not None else cfg.concurrency):
        for target in cfg.targets:
            results, duration = await run_level(cfg, target, models[target], level)
            rows.append({"server": target.label, "url": target.url, "model": models[target],
                         "concurrency": level, "rate": cfg.rate, **summarize(results, duration, cfg.slo)})
        # Each server's throughput against the first one's at this level (e.g. speculation on vs off).
        first = rows[-len(cfg.targets)]["output_tokens_per_s"]
        for row in rows[-len(cfg.targets):]:
            row["vs_first"] = row["output_tokens_per_s"] / first if first else None
    return rows


def _fmt(p: dict[str, float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in p.values())


def format_markdown(report: dict[str, Any]) -> str:
    slo = report["config"]["slo"]
    limits = ", ".join(f"{k.replace('_ms', '')} <= {v:g} ms" for k, v in slo.items() if v is not None) or "none"
    lines = [
        f"Load: {report['config']['load']}, {report['config']['num_prompts']} prompts, max_tokens "
        f"{report['config']['max_tokens']}, temperature {report['config']['temperature']}; goodput SLO: {limits}",
        "",
        "| server | load | ok | errors | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | e2e p50/p90/p99 ms "
        f"| output tok/s | vs {report['results'][0]['server'] if report['results'] else 'first'} "
        "| per-request tok/s | goodput req/s | tau | alpha |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        load = f"c={row['concurrency']}" if row["concurrency"] is not None else f"{row['rate']:g} req/s"
        errors = ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "0"
        tau = f"{row['mean_tau']:.2f}" if row["mean_tau"] is not None else "-"
        alpha = f"{row['alpha']:.2f}" if row.get("alpha") is not None else "-"
        vs = f"{row['vs_first']:.2f}x" if row.get("vs_first") is not None else "-"
        per = f"{row['per_request_tokens_per_s']:.1f}" if row.get("per_request_tokens_per_s") is not None else "-"
        lines.append(f"| {row['server']} | {load} | {row['ok']}/{row['requests']} | {errors} | {_fmt(row['ttft_ms'])} "
                     f"| {_fmt(row['tpot_ms'])} | {_fmt(row['e2e_ms'])} | {row['output_tokens_per_s']:.1f} | {vs} "
                     f"| {per} | {row['goodput_requests_per_s']:.2f} | {tau} | {alpha} |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, report: dict[str, Any]) -> bool:
    """serve.png: output tokens/s against concurrency, one line per server (with matplotlib)."""
    from outrider.bench.report import _pyplot

    rows = [r for r in report["results"] if r["concurrency"] is not None]
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for server in dict.fromkeys(r["server"] for r in rows):
        pts = [(r["concurrency"], r["output_tokens_per_s"]) for r in rows if r["server"] == server]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=server)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_xticks(sorted({r["concurrency"] for r in rows}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)
    plt.close(fig)
    return True


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", type=parse_target, action="append", required=True, dest="urls",
                        help="server base URL, or label=URL; repeat to compare servers in one run "
                        "(e.g. --url spec=http://127.0.0.1:8000 --url off=http://127.0.0.1:8001)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_levels, default=None, help="clients in flight, e.g. 1,2,4 (default 1)")
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per server and load level")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="Spec-Bench question.jsonl (first turns are sent)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="completions: a plain 'User: ... Assistant:' prompt (models without a chat "
                        "template); chat: messages through the server's template")
    parser.add_argument("--model", default=None, help="model id to send (default: the server's first)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: TTFT limit (<= 0: none)")
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput: TPOT limit (<= 0: none)")
    parser.add_argument("--slo-e2e-ms", type=float, default=0.0, help="goodput: end-to-end limit (<= 0: none)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per server and level")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it counts as failed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times")
    parser.add_argument("--out", default=None, help="folder for serve.json and serve.md (default: print only)")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    if args.rate is not None and not args.rate > 0:
        raise ValueError(f"--rate {args.rate} is invalid: use requests per second > 0")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} is invalid: use an integer >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} is invalid: use an integer >= 0")
    labels = [t.label for t in args.urls]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--url labels {labels} repeat: give each server its own label=URL")

    def limit(ms: float) -> float | None:
        return ms if ms > 0 else None

    return LoadConfig(
        targets=args.urls, prompts=load_prompts(args.dataset, args.num_prompts),
        concurrency=args.concurrency or [1], rate=args.rate, max_tokens=args.max_tokens,
        temperature=args.temperature, endpoint=args.endpoint, model=args.model,
        slo=SLO(limit(args.slo_ttft_ms), limit(args.slo_tpot_ms), limit(args.slo_e2e_ms)),
        timeout_s=args.timeout, seed=args.seed, warmup=args.warmup,
    )


def run_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    rows = asyncio.run(run_load(cfg))
    load = f"Poisson {cfg.rate:g} req/s" if cfg.rate is not None else f"concurrency {cfg.concurrency}"
    report = {
        "config": {"load": load, "num_prompts": len(cfg.prompts), "dataset": str(args.dataset),
                   "endpoint": cfg.endpoint, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                   "slo": asdict(cfg.slo), "servers": {t.label: t.url for t in cfg.targets}},
        "results": rows,
    }
    markdown = format_markdown(report)
    print(markdown)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "serve.md").write_text(markdown)
        plotted = _plot(out, report)
        print(f"Written to {out}/serve.json and serve.md" + (" and serve.png" if plotted else ""))
    return 0
