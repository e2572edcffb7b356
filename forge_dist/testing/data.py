"""Small datasets for tests, cut from the bundled corpus."""
from pathlib import Path


def corpus_dataset(root, n_chars: int, name: str = "small") -> str:
    """A char-level dataset folder ``root/name`` made from the first ``n_chars`` of the bundled
    corpus (10% validation); returns its path."""
    from forge_dist.data.prepare import CORPUS, prepare_text

    root = Path(root)
    text = root / f"{name}.txt"
    text.write_text(CORPUS.read_text(encoding="utf-8")[:n_chars], encoding="utf-8")
    prepare_text([text], root / name, tokenizer="char", val_fraction=0.1)
    return str(root / name)
