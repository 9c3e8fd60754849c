"""A word-level tokenizer in CLIP's BPE format, for models trained here (the toy `tiny`) and benchmark stand-ins.

Every word of a fixed list becomes ONE token; any other text falls back to single characters.
transformers' CLIPTokenizer reads the result (vocab + merges) like any CLIP tokenizer.
"""

from __future__ import annotations

import itertools
import string


def tokenizer_files(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE vocabulary: single characters (with and without </w>), then each word as ONE token.

    Merges are added by simulating BPE on each word with the merges so far and appending a merge for
    its first two pieces until it is whole. A merge appended later has a higher rank than all before
    it, so it never changes a word that is already whole (that word always had a lower-ranked pair
    to merge). Merges that are simply each word's left-to-right prefixes can clash: "re" from "red"
    outranks "gr" and splits "green".
    """
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(pieces := _bpe(word, merges)) > 1:
            pair = (pieces[0], pieces[1])
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = pieces[i], pieces[i + 1]
        merged, j = [], 0
        while j < len(pieces):  # merge every occurrence of that pair, left to right
            if j < len(pieces) - 1 and pieces[j] == first and pieces[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces
