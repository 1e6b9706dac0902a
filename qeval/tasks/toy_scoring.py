"""The scoring loop the toy tasks share: greedy generation, an answer extracted and compared."""

from __future__ import annotations

from qeval.data.toy import Example


def score_generations(handle, examples: list[Example], desc: str, batch_size: int, max_new_tokens: int,
                      extract, breakdown: str) -> list[dict]:
    """Greedy-generate each prompt, compare ``extract(output)`` with the answer, and return the
    accuracy per ``Example.kind`` (as column ``breakdown``) and overall."""
    hits: dict[str, list[bool]] = {}
    bar = handle.progress_bar(len(examples), desc)
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        outputs = handle.generate([e.prompt for e in batch], max_new_tokens=max_new_tokens)
        for e, out in zip(batch, outputs):
            hits.setdefault(e.kind, []).append(extract(out) == e.answer)
        bar.update(len(batch))
    bar.close()
    rows = [{"metric": "accuracy", "value": sum(h) / len(h), "n": len(h), breakdown: kind}
            for kind, h in sorted(hits.items())]
    flat = [x for h in hits.values() for x in h]
    rows.append({"metric": "accuracy", "value": sum(flat) / len(flat), "n": len(flat)})
    return rows
