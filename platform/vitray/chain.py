"""Caption -> generated image -> label -> look-alikes: the platform's models chained.

1. a generator (``train.task: generation``) draws ``n`` images for the prompt (seeds ``seed``, ``seed + 1``, ...);
2. a classifier labels each (its top class and probability);
3. each image is embedded with the model that built a catalogue (the output folder of `vitray embed` over a set of
   real images: its job record names that model) and the ``k`` catalogue rows nearest by cosine similarity are
   returned, with their ids, where they come from and, when the source can be read (packed shards, Parquet, image
   files), their image bytes.

`vitray generate PROMPT --model GEN --classify CLS --catalogue DIR` runs it and writes what it found beside the
images (``chain.json``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from vitray import storage

__all__ = ["Catalogue", "ChainResult", "Lookalike", "run_chain", "CatalogueError"]


class CatalogueError(ValueError):
    """Not a `vitray embed` output, or an empty one."""


@dataclass
class Lookalike:
    id: str
    source: str
    similarity: float
    image: bytes | None = None


@dataclass
class ChainResult:
    prompt: str
    seed: int
    png: bytes
    steps: int = 0
    guidance: float = 0.0
    label: int | None = None
    name: str | None = None
    score: float | None = None
    lookalikes: list[Lookalike] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "steps": self.steps, "guidance": self.guidance,
                "label": self.label, "name": self.name, "score": self.score,
                "lookalikes": [{"id": x.id, "source": x.source, "similarity": x.similarity} for x in self.lookalikes]}


class Catalogue:
    """The embeddings of a `vitray embed` output, L2-normalised, and the model that made them."""

    def __init__(self, folder: str):
        import pyarrow.parquet as pq

        from vitray.batch.score import JOB_FILE, _parts

        job_path = storage.join(folder, JOB_FILE)
        if not storage.is_file(job_path):
            raise CatalogueError(f"--catalogue {folder}: not a `vitray embed` output (no {JOB_FILE})")
        job = json.loads(storage.read_text(job_path))
        if job.get("outputs") != "embedding":
            raise CatalogueError(f"--catalogue {folder}: holds `vitray score` answers, not embeddings (`vitray embed`)")
        self.model_uri = job["model"]["uri"]
        ids, sources, vecs = [], [], []
        for part in _parts(folder):
            with storage.open_input(part) as f:
                t = pq.read_table(f, columns=["id", "source", "embedding", "error"])
            for i, s, e, err in zip(*(t.column(c).to_pylist() for c in ("id", "source", "embedding", "error"))):
                if err is None and e is not None:
                    ids.append(i)
                    sources.append(s)
                    vecs.append(e)
        if not ids:
            raise CatalogueError(f"--catalogue {folder}: no embeddings")
        v = np.asarray(vecs, dtype=np.float32)
        self.vectors = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        self.ids, self.sources = ids, sources

    def __len__(self) -> int:
        return len(self.ids)

    def nearest(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        q = np.asarray(queries, dtype=np.float32)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        sim = q @ self.vectors.T
        k = min(k, len(self.ids))
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return [[(int(j), float(sim[r, j])) for j in row] for r, row in enumerate(top)]

    def image(self, index: int) -> bytes | None:
        """The catalogue row's image bytes, when its source is a Parquet file (packed shards) or an image file."""
        source, rid = self.sources[index], self.ids[index]
        try:
            if source.endswith(".parquet"):
                import pyarrow.compute as pc
                import pyarrow.parquet as pq

                with storage.open_input(source) as f:
                    t = pq.read_table(f, columns=["id", "image"])
                hit = t.filter(pc.equal(t.column("id"), rid))
                return hit.column("image")[0].as_py() if hit.num_rows else None
            return storage.read_bytes(source) if storage.is_file(source) else None
        except (OSError, KeyError, ValueError):
            return None


def run_chain(generator: str, classifier: str | None, catalogue: str | None, prompt: str, *, n: int = 4,
              seed: int = 0, k: int = 5, steps: int | None = None, guidance: float | None = None,
              tracking_uri: str | None = None, device: str = "cpu") -> list[ChainResult]:
    """Generate, label and find look-alikes (module docstring); ``classifier`` and ``catalogue`` are optional."""
    import tempfile

    from vitray.predict import Predictor
    from vitray.tasks.generation.generator import Generator, png_bytes
    from vitray.tracking.uris import resolve_model_uri

    with tempfile.TemporaryDirectory(prefix="vitray-chain-") as tmp:
        gen = Generator(resolve_model_uri(generator, tracking_uri, dest=f"{tmp}/gen"), device=device)
        steps, guidance = gen.check(prompt, steps, guidance)
        images = gen.generate([prompt] * n, list(range(seed, seed + n)), steps=steps, guidance=guidance)
        results = [ChainResult(prompt, seed + i, png_bytes(im), steps, guidance) for i, im in enumerate(images)]
        rgb = [np.ascontiguousarray(im) for im in images]
        if classifier:
            labeller = Predictor.from_export(resolve_model_uri(classifier, tracking_uri, dest=f"{tmp}/cls"))
            names = labeller.class_names
            for r, p in zip(results, labeller.probabilities(rgb)):
                r.label = int(np.argmax(p))
                r.name = names[r.label] if r.label < len(names) else str(r.label)
                r.score = float(p[r.label])
        if catalogue:
            cat = Catalogue(catalogue)
            embedder = Predictor.from_export(resolve_model_uri(cat.model_uri, tracking_uri, dest=f"{tmp}/emb"),
                                             outputs="embedding")
            vectors = np.stack([np.asarray(v, dtype=np.float32) for v in embedder.predict(rgb)])
            for r, hits in zip(results, cat.nearest(vectors, k)):
                r.lookalikes = [Lookalike(cat.ids[j], cat.sources[j], s, cat.image(j)) for j, s in hits]
    return results
