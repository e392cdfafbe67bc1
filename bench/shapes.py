"""Checkpoint directories without weights, for `load_format: dummy`: a shape's config.json plus a
tokenizer (with its chat template), so that `hearth serve --model DIR --load-format dummy` serves
a model of that shape with random weights.

    python bench/shapes.py OUT --tokenizer .gpu/tokenizer [--shapes SHAPE ...]   # OUT/SHAPE/

Any tokenizer whose ids stay below the shape's vocabulary will do (SmolLM2's 49152-token one for
the Llama-3 shapes' 128256): the weights are random, so is the text.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

from bench.engine_bench import SHAPES

# The ids of SmolLM2's tokenizer (<|im_start|>, <|im_end|>): what the chat template writes.
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)


def write_checkpoint(shape: str, out: Path, tokenizer_dir: Path) -> Path:
    """OUT with the shape's config.json (bf16) and the tokenizer files of tokenizer_dir."""
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], **SPECIAL_IDS, tie_word_embeddings=shape == "tiny")
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    for item in tokenizer_dir.iterdir():
        if item.is_file() and item.name != "config.json":
            shutil.copy(item, out / item.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "llama-3.3-70b"])
    args = parser.parse_args()
    for shape in args.shapes:
        print(write_checkpoint(shape, args.out / shape, args.tokenizer))


if __name__ == "__main__":
    main()
