"""Write a Hugging Face tokenizer folder whose words are token ids written as numbers, for
Megatron-LM's ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``. No tokenizer can
be downloaded here, and Megatron-LM's NullTokenizer (which reads the same kind of text) does not
run in its static inference engine (no BOS id; any word that is not a number fails).

    python scripts/write_number_tokenizer.py DIR [--vocab-size 32000]

The text ``"17 3 25"`` tokenizes to the ids ``[17, 3, 25]``: the words ``"0"`` to
``str(vocab_size - 2)`` are the ids 0 to vocab_size - 2, split on whitespace. Id vocab_size - 1 is
``<unk>``: any other word (``"warmup"``, which Megatron-LM's CUDA-graph warm-up sends) and the
end-of-document token, where NullTokenizer puts its end of document too. There is no BOS token
(Megatron's generation adds none unless asked, and strips leading BOS ids from prompts).
Detokenizing joins the words with single spaces. ``len(tokenizer)`` is vocab_size, so Megatron
pads the vocabulary as it would for ``--tokenizer-type NullTokenizer --vocab-size vocab_size``.

Plain JSON (a WordLevel model, a whitespace-split pre-tokenizer, a WordPiece decoder with
nothing to strip), written without the ``tokenizers`` package, in a layout that old and new
``tokenizers`` releases read.
"""

import argparse
import json
import os

UNKNOWN = "<unk>"


def number_tokenizer_files(vocab_size: int) -> dict:
    """{file name: JSON object} of the tokenizer folder."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (numbers and {UNKNOWN}), got {vocab_size}")
    vocab = {str(i): i for i in range(vocab_size - 1)}
    vocab[UNKNOWN] = vocab_size - 1
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": vocab_size - 1, "content": UNKNOWN, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        # no word starts with the prefix, so decoding is words joined by one space
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNKNOWN},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNKNOWN,
        "eos_token": UNKNOWN,
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def write_number_tokenizer(path: str, vocab_size: int) -> str:
    """Write the folder (created if missing, files replaced); returns ``path``."""
    os.makedirs(path, exist_ok=True)
    for name, content in number_tokenizer_files(vocab_size).items():
        temporary = os.path.join(path, f".{name}.tmp")
        with open(temporary, "w") as f:
            json.dump(content, f)
        # a reader running beside the writer sees the old file or the new one, never half
        os.replace(temporary, os.path.join(path, name))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="folder to write tokenizer.json and tokenizer_config.json to")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="ids 0..N-2 are the numbers, N-1 is <unk> (default 32000)")
    args = parser.parse_args()
    if args.vocab_size < 2:
        parser.error(f"--vocab-size must be at least 2, got {args.vocab_size}")
    write_number_tokenizer(args.path, args.vocab_size)
    print(f"write_number_tokenizer: {args.path} (vocab {args.vocab_size}, <unk> = eod = "
          f"{args.vocab_size - 1})")


if __name__ == "__main__":
    main()
