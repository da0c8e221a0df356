"""The `masa` command. Each sub-command is a thin call into the module that owns the work.

Bad configuration or input is reported as one line naming the field or file, exit code 2, no
traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from masa_megatron.errors import TrainingStopped, UserError

EXIT_BAD_INPUT = 2


def _config_and_overrides(args) -> tuple:
    """`masa train a=b` has no file: a first positional with '=' that is no file is an override."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        config, overrides = None, [config] + overrides
    return config, overrides


def _cmd_config_show(args) -> int:
    from masa_megatron.config import load_config, to_yaml
    cfg = load_config(*_config_and_overrides(args), base=_recipe_base(args.recipe))
    print(to_yaml(cfg), end="")
    return 0


def _cmd_config_validate(args) -> int:
    from masa_megatron.config import load_config
    from masa_megatron.config_checks import validate_environment
    cfg = load_config(*_config_and_overrides(args), base=_recipe_base(args.recipe))
    if args.environment:
        validate_environment(cfg)
    print(f"config OK: {cfg.name} (mode={cfg.masa.mode})")
    return 0


def _recipe_base(name):
    if not name:
        return None
    from recipes import get_recipe
    return get_recipe(name)


def _cmd_train(args) -> int:
    from masa_megatron.train.main import run_training
    return run_training(*_config_and_overrides(args), recipe=args.recipe)


def _cmd_demo(args) -> int:
    from masa_megatron.demo.run import main as demo_main
    return demo_main(args.demo_args)


def _cmd_eval(args) -> int:
    from masa_megatron.eval.run import main as eval_main
    return eval_main(args.eval_args)


def _cmd_convert(args) -> int:
    from masa_megatron.model import convert_cli
    entry = {"hf2mcore": convert_cli.hf_to_megatron_main,
             "mcore2hf": convert_cli.megatron_to_hf_main}[args.direction]
    return entry(args.convert_args)


def _cmd_rehearse(args) -> int:
    from masa_megatron.rehearsal.run import main as rehearse_main
    return rehearse_main(args.rehearse_args)


def _cmd_recipes(args) -> int:
    from recipes import print_recipe_table
    print_recipe_table(markdown=args.markdown)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masa", description="MASA (meta-awareness via self-alignment) RL on Megatron-core.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, handler: Callable, passthrough: str | None = None):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        if passthrough:
            p.add_argument(passthrough, nargs=argparse.REMAINDER,
                           help="arguments of the sub-command (see its --help)")
        return p

    p = add("train", "Run RL training (GRPO / MASA / MASA-efficient) from a YAML config or "
                     "recipe; launch under torchrun for several ranks.", _cmd_train)
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.group_size=8")
    p.add_argument("--recipe", help="start from a registered recipe (see `masa recipes`)")

    p = add("config", "Show or validate a resolved experiment config.", None)
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    for action, help_, handler in (
            ("show", "Print the resolved YAML (defaults + file + overrides).", _cmd_config_show),
            ("validate", "Validate statically (and --environment: on this machine).",
             _cmd_config_validate)):
        a = csub.add_parser(action, help=help_, description=help_)
        a.set_defaults(handler=handler)
        a.add_argument("config", nargs="?", help="YAML config file")
        a.add_argument("overrides", nargs="*", help="dotted overrides, e.g. masa.mode=grpo")
        a.add_argument("--recipe", help="start from a registered recipe")
        if action == "validate":
            a.add_argument("--environment", action="store_true",
                           help="also check CUDA / Transformer Engine / files on this machine")

    add("demo", "The CPU demo: GRPO vs MASA vs MASA-efficient on a synthetic task, with a "
                "report (see `masa demo --help`).", _cmd_demo, "demo_args")
    add("eval", "Evaluate a checkpoint: pass@k on math benchmarks and a meta-awareness report "
                "(see `masa eval --help`).", _cmd_eval, "eval_args")
    p = add("convert", "Convert checkpoints: hf2mcore (HF -> Megatron dist checkpoint) or "
                       "mcore2hf (Megatron -> HF safetensors).", _cmd_convert)
    p.add_argument("direction", choices=["hf2mcore", "mcore2hf"])
    p.add_argument("convert_args", nargs=argparse.REMAINDER,
                   help="arguments of the converter (see `masa convert DIRECTION --help`)")
    p = add("recipes", "List the registered training recipes.", _cmd_recipes)
    p.add_argument("--markdown", action="store_true",
                   help="docs/launching.md's table (one row per model size) instead")
    add("rehearse", "Rehearse a recipe on CPU at its real process topology with a tiny model "
                    "and stand-in SGLang servers (see `masa rehearse --help`).", _cmd_rehearse,
        "rehearse_args")
    return parser


PASSTHROUGH = {"demo": "demo_args", "eval": "eval_args", "convert": "convert_args",
               "rehearse": "rehearse_args"}


def main(argv: list[str] | None = None) -> int:
    from masa_megatron.lifecycle import end_with_launcher
    end_with_launcher()                 # under torchrun: this rank ends when torchrun does
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH and not {"-h", "--help"} & set(argv[:1 + (argv[0] == "convert")]):
        # sub-commands with their own parsers get every remaining argument, options included
        head = argv[:2] if argv[0] == "convert" else argv[:1]
        args = parser.parse_args(head)
        setattr(args, PASSTHROUGH[argv[0]], argv[len(head):])
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as err:
        print(f"masa: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as err:
        print(f"masa: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("masa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `masa recipes | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
