"""Command line: fine-tune an image encoder with Circle Loss, index a folder, search it, evaluate.

Each command parses options into a config and makes one library call. Heavy libraries (torch, faiss,
open_clip) are imported inside the commands, so `--help` stays instant.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from retrieval import __version__
from retrieval.errors import RetrievalError

DEFAULT_MODEL = "lite0"


class _Group(click.Group):
    """A group whose commands turn library errors into one line on stderr and exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RetrievalError as exc:
            raise click.ClickException(str(exc)) from None


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="circle-retrieval")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Fine-grained image retrieval: fine-tune an open_clip encoder with Circle Loss,
    index a folder into LMDB + FAISS, query it by example image, and report Recall@K.

    \b
    Typical session:
      python cli.py make-dataset data/birds
      python cli.py finetune --dataset cub --root data/birds --out runs/birds
      python cli.py index data/birds/images --model runs/birds --db db/birds
      python cli.py query some.jpg --db db/birds
      python cli.py eval --db db/birds
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command("make-dataset")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=40, show_default=True, help="Number of fine-grained classes.")
@click.option("--per-class", default=30, show_default=True, help="Images per class.")
@click.option("--size", default=160, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def make_dataset_cmd(out_dir: Path, classes: int, per_class: int, size: int, seed: int, as_json: bool) -> None:
    """Generate the embedded fine-grained set (stylised birds) in CUB-200-2011 format.

    Classes differ in subtle attributes (shade, wing bar, beak length, eye ring);
    instances vary more in pose, scale, position, clutter, lighting and JPEG quality.
    The first half of the classes is the train split, the second half the test split.
    """
    from retrieval.data.generate import GenerateConfig, make_dataset

    summary = make_dataset(GenerateConfig(out_dir=out_dir, classes=classes, per_class=per_class, size=size, seed=seed))
    if as_json:
        _print_json(summary)
    else:
        click.echo(
            f"wrote {summary['images']} images of {summary['classes']} classes to {out_dir} "
            f"(train {summary['train_classes']} classes / test {summary['test_classes']} classes)"
        )


def main() -> None:
    cli(prog_name="cli.py")


if __name__ == "__main__":
    main()
