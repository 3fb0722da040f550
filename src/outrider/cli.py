"""`outrider demo | generate | chat | convert | bench | train` — options mirror the Python API (SpeculativeDecoder)."""

from __future__ import annotations

import argparse
import json
import sys

from outrider.bench.cli import parse_draft_length as _draft_length
from outrider.drafters import REGISTRY


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} is not a comma-separated list of integers")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="target model folder (default: the embedded demo target)")
    p.add_argument("--draft", default=None, help="draft model folder (default with no --target: embedded draft)")
    p.add_argument("--method", default="draft_model", help=f"drafting method: {', '.join(sorted(REGISTRY))}")
    p.add_argument("--k", type=_draft_length, default=None,
                   help="draft length: tokens proposed per step, or 'auto' (chosen per step; the "
                        "default for draft_model)")
    p.add_argument("--width", type=int, default=None,
                   help="draft tree: children per expanded node (1 = a chain; default: the method's)")
    p.add_argument("--backend", default="auto",
                   help="auto (native where supported), native, hf, or compiled (native under torch.compile)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16, float16, or int8 / int4 (weight-only, native backend; a quantized "
                        "model, reproduced exactly) (default: as stored)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file, for chat with a model that has none (or to replace its own)")
    p.add_argument("--datastore", default=None,
                   help="suffix, eagle+suffix: the target's answers to other requests to draft from (a datastore.npy, "
                        "or a head folder holding one: `outrider train drafter` and `train datastore` write them)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (exact)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrider", description="Lossless speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion")
    _add_model_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_int_list, help="prompt token ids, e.g. 1,2,3")
    _add_sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    gen.add_argument("--show-drafts", action="store_true", help="mark drafted-and-accepted tokens")
    gen.add_argument("--chat", action="store_true", help="send --prompt as a user message through the chat template")

    chat = sub.add_parser("chat", help="an interactive chat: streamed answers, drafted tokens marked")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation with")

    demo = sub.add_parser("demo", help="a real model answering chat requests (or the embedded pair): streamed "
                                       "answers and a measured table")
    demo.add_argument("--target", default="auto",
                      help="target folder; 'auto' (default): SmolLM2-135M-Instruct where its wheel is installed, "
                           "else the embedded pair; 'embedded': the embedded pair")
    demo.add_argument("--draft", default=None, help="draft folder (default: the embedded demo draft)")
    demo.add_argument("--k", type=_draft_length, default=None, help="draft length for draft_model, or 'auto' (default)")
    demo.add_argument("--dtype", default=None, help="float32, bfloat16, int8, int4 (default: as stored)")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--no-stream", action="store_true", help="only print the measured table")
    demo.add_argument("--head", default=None, help="an EAGLE head for the target (default: the embedded one)")

    convert = sub.add_parser("convert", help="write a GGUF file as a Hugging Face model folder (once)")
    convert.add_argument("gguf", help="a .gguf model file (llama.cpp's format)")
    convert.add_argument("--out", required=True, help="the folder to write (must not hold a model yet)")
    convert.add_argument("--dtype", default="bfloat16", help="dtype of the dequantized weights (default bfloat16)")

    from outrider.bench import build_parser as bench_parser

    bench_parser(sub.add_parser("bench", help="Spec-Bench-protocol benchmark: speedup, tau, alpha per method"))

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with speculative-decoding metrics")
    _add_model_args(serve)
    from outrider.serve.cli_args import build_parser as serve_parser

    serve_parser(serve)

    train = sub.add_parser("train", help="training recipes")
    train_sub = train.add_subparsers(dest="recipe", required=True)
    from outrider.train.recipe import build_parser as demo_pair_parser

    demo_pair_parser(train_sub.add_parser("demo-pair", help="train the embedded target + draft pair"))
    from outrider.train.eagle import build_parser as drafter_parser

    drafter_parser(train_sub.add_parser("drafter", help="train a self-drafting head (eagle) for any target"))
    from outrider.train.datastore import build_parser as datastore_parser

    datastore_parser(train_sub.add_parser("datastore", help="the target's answers of `train drafter` runs as one "
                                                            "datastore (for --method suffix --datastore FILE)"))
    return parser


def decoder_options(args: argparse.Namespace) -> dict:
    """SpeculativeDecoder.from_pretrained's keywords from the shared model options (_add_model_args):
    generate, chat and serve (one process or Ray replicas) build their decoders from these."""
    return dict(target=args.target, draft=args.draft, method=args.method, k=args.k, width=args.width,
                backend=args.backend, dtype=args.dtype, device=args.device, chat_template=args.chat_template,
                datastore=args.datastore)


def _decoder(args: argparse.Namespace):
    from outrider import SpeculativeDecoder

    return SpeculativeDecoder.from_pretrained(**decoder_options(args))


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def _summary(method: str, stats) -> str:
    return (f"[{method}] {stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s, "
            f"tau {stats.tau:.2f}, alpha {stats.alpha:.2f}")


def _generate(args: argparse.Namespace) -> int:
    from outrider import SpecStats
    from outrider.render import legend, render_chunk, wants_colour

    if args.chat and args.prompt is None:
        raise ValueError("--chat sends --prompt as a user message: give --prompt text, not --prompt-ids")
    dec = _decoder(args)
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    options = _sampling(args)
    if args.chat:
        prompt = dec.chat_ids([{"role": "user", "content": args.prompt}])
    if args.json:
        res = dec.generate(prompt, **options)
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                          "method": dec.method, "stats": res.stats.to_dict()}))
        return 0
    if dec.tokenizer is None:
        res = dec.generate(prompt, **options)
        print(",".join(map(str, res.token_ids)))
        stats = res.stats
    else:
        colour = wants_colour(sys.stdout)
        stats = SpecStats()
        for chunk in dec.stream(prompt, stats=stats, **options):
            sys.stdout.write(render_chunk(chunk, colour) if args.show_drafts else chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.show_drafts:
            print(legend(colour))
    print(_summary(dec.method, stats), file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    """A read-answer loop on stdin: each answer joins the history, so later turns see the earlier."""
    from outrider import SpecStats
    from outrider.render import legend, render_chunk, wants_colour

    dec = _decoder(args)
    dec.chat_ids([{"role": "user", "content": "hi"}])  # no template: say so now, not after the first line
    colour = wants_colour(sys.stdout)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"outrider chat ({dec.method}); an empty line or Ctrl-D ends it. {legend(colour)}", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        stats = SpecStats()
        pieces = []
        for chunk in dec.stream(messages=messages, stats=stats, **_sampling(args)):
            sys.stdout.write(render_chunk(chunk, colour))
            sys.stdout.flush()
            pieces.append(chunk.text)
        sys.stdout.write("\n")
        print(_summary(dec.method, stats), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "demo":
            from outrider.demo import resolve_target, run_demo

            run_demo(resolve_target(args.target, sys.stdout), args.draft, k=args.k,
                     max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                     show=not args.no_stream, head=args.head)
            return 0
        if args.command == "convert":
            from outrider.models import parse_dtype
            from outrider.models.gguf import convert_gguf

            print(convert_gguf(args.gguf, args.out, parse_dtype(args.dtype)))
            return 0
        if args.command == "bench":
            from outrider.bench import run_from_args as bench_run

            return bench_run(args)
        if args.command == "serve":
            from outrider.serve.server import run_from_args as serve_run

            return serve_run(args)
        if args.command == "train" and args.recipe == "datastore":
            from outrider.train.datastore import run_from_args as train_datastore

            return train_datastore(args)
        if args.command == "train" and args.recipe == "drafter":
            from outrider.train.eagle import run_from_args as train_drafter

            return train_drafter(args)
        if args.command == "train":
            from outrider.train.recipe import run_from_args

            return run_from_args(args, argv[2:])
    except ValueError as exc:
        print(f"outrider: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
