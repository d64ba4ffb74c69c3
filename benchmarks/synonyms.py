"""Can the text encoder tell which colour a word the captions never use names?

The evaluation's synonyms group asks for colours in words no caption template writes ("ruby",
"sapphire", "ivory"). The UNet only learns colours from the captions' words, so it can draw a
new word's colour only if the frozen text encoder already puts that word near the colour it
names. This checks the encoder alone, no model trained: for every colour synonym, in the
synonyms group's phrasing and in the template phrasing, the nearest of the eight training colour
prompts by cosine similarity of mean-pooled states (the sentence embedding all-MiniLM-L6-v2 was
trained for). Chance is 1/8.

    .venv/bin/python benchmarks/synonyms.py [--encoder minilm|/path/to/a/transformers/text/encoder]
"""

from __future__ import annotations

import argparse

import torch

from blossom.config import TextConfig
from blossom.data import synthetic
from blossom.evalset import COLOR_SYNONYMS
from blossom.models import load_text_encoder, tokenize

PHRASINGS = {
    "synonyms": "a {} blossom with five round petals in a meadow",
    "template": "a {} flower with five round petals on green grass",
}


def sentence_embeddings(encoder, prompts: list[str]) -> torch.Tensor:
    mask = torch.from_numpy(tokenize(encoder.tokenizer, prompts, encoder.max_tokens)["attention_mask"]).float()
    states = encoder(prompts)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=TextConfig.encoder, help="text.encoder: minilm or a local folder")
    args = ap.parse_args()
    encoder = load_text_encoder(TextConfig(encoder=args.encoder))
    colors = list(synthetic.PETAL_COLORS)
    references = sentence_embeddings(encoder, [PHRASINGS["template"].format(c) for c in colors])
    hits = dict.fromkeys(PHRASINGS, 0)
    total = 0
    print(f"{'word':>16}  {'names':>7}  " + "  ".join(f"{p + ' phrasing':>22}" for p in PHRASINGS))
    for color, words in COLOR_SYNONYMS.items():
        for word in words:
            cells = []
            for name, template in PHRASINGS.items():
                sims = (sentence_embeddings(encoder, [template.format(word)]) @ references.T)[0]
                nearest = colors[int(sims.argmax())]
                hits[name] += nearest == color
                cells.append(f"{nearest:>7} {'ok' if nearest == color else '--'} ({float(sims.max()):.2f})")
            total += 1
            print(f"{word:>16}  {color:>7}  " + "  ".join(f"{c:>22}" for c in cells))
    for name, n in hits.items():
        print(f"{name} phrasing: nearest colour right for {n} of {total} words (chance {total / len(colors):.0f})")


if __name__ == "__main__":
    main()
