"""The ``longrope`` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rope_ext.factors import Ladder, json_schema, load_ladder, save_ladder


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
    from rope_ext.model_files import ModelPackageMissing, prepare_model

    try:
        print(prepare_model(args.out))
    except ModelPackageMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longrope", description="LongRoPE factor sets and serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="serve the OpenAI-compatible API (longrope serve --help)", add_help=False)
    prep = sub.add_parser("prepare-model", help="make the default model's transformers directory; print its path")
    prep.add_argument("--out", type=Path, help="target directory (default: $LONGROPE_MODEL_DIR or the user cache)")
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
    p.add_argument("--method", choices=["pi", "ntk", "yarn"], required=True)
    p.add_argument("--model", type=Path, required=True, help="model directory holding config.json")
    p.add_argument("--window", type=int, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_baseline)
    p = factors.add_parser("schema", help="print the factor file's JSON Schema")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its unknown flags belong to vLLM, so it parses its own arguments
        from server.main import serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # FactorFileError included: bad input is exit 2, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
