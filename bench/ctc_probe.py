"""What the speech adapter hears: its CTC transcript and what the shrink keeps, per question.

    python bench/ctc_probe.py --model runs/tiny/s2t/model --qa data/tiny/test/qa.jsonl --n 100

For each spoken question: the adapter's frames, the frames the shrink keeps, the share of
frames whose CTC argmax is the blank, and the greedy CTC transcript (runs collapsed, blanks
removed) with its word error rate against the question text. A printed table sums them up
(means; WER over all words); `--show K` prints the first K transcripts. An adapter that
never predicts a blank keeps one frame per run of equal tokens, so a long run of one token
(e.g. "?") swallows whatever was said there.

`--llm-asr` also asks the LLM itself to transcribe each question (the Stage I ASR prompt,
"Transcribe this audio.", greedy, `--batch-size` at a time): what reaches the LLM, whatever
the shrink does. That is the measure for a no-shrink adapter, whose CTC head does not choose
the LLM's inputs. Both transcripts are also scored by their *name recall*: the share of the
question's names (its capitalised words after the first) that the transcript contains, since
the entity is what an answer needs and what the adapter used to lose.

`--asr faster-whisper` also transcribes each question with a whole ASR (default Whisper
tiny.en: the encoder the adapter reads, with Whisper's own decoder), scored the same way: how
much of what the adapter misses that encoder still carries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from echox.config import int_at_least


def probe(model, wave: np.ndarray) -> dict:
    with torch.no_grad():
        out = model.encode_speech([wave])
    n = int(out.frame_lengths[0])
    # each frame's argmax as the shrink reads it (with the adapter's shrink_blank_penalty)
    ids = model.adapter.ctc_token_ids(model.adapter.shrink_argmax(out.ctc_logits[0, :n])).tolist()
    blank = model.adapter.blank_id
    collapsed = [t for i, t in enumerate(ids) if (i == 0 or t != ids[i - 1]) and t != blank]
    return {"frames": n, "kept": int(out.lengths[0]), "blank_share": sum(t == blank for t in ids) / n,
            "ctc_text": model.tokenizer.decode(collapsed).strip()}


_PUNCT = ".,?!;:'\"()"


def names(question: str) -> list[str]:
    """The capitalised words of a question after its first word ("Which country is José
    Mojica a citizen of?" -> ["josé", "mojica"]), casefolded, without punctuation."""
    words = [w.strip(_PUNCT) for w in question.split()[1:]]
    return [w.casefold() for w in words if w[:1].isupper()]


def name_recall(question: str, transcript: str) -> tuple[int, int]:
    """(names found in the transcript, names in the question)."""
    want = names(question)
    heard = {w.strip(_PUNCT).casefold() for w in transcript.split()}
    return sum(w in heard for w in want), len(want)


def llm_transcripts(model, waves: list[np.ndarray], batch_size: int) -> list[str]:
    from echox.data.s2t_mix import ASR_PROMPT
    from echox.model.generation import SamplingConfig
    from echox.model.prompt import Turn

    out: list[str] = []
    sampling = SamplingConfig(max_new_tokens=40)
    for i in range(0, len(waves), batch_size):
        dialogues = [[Turn("user", text=ASR_PROMPT, audio=w)] for w in waves[i: i + batch_size]]
        with torch.no_grad():
            out += [t.strip() for t in model.generate_text(dialogues, sampling).texts]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="EchoX checkpoint or bundle folder")
    p.add_argument("--qa", default="data/tiny/test/qa.jsonl", help="local: QA JSONL with audio")
    p.add_argument("--n", type=int_at_least(1), default=100)
    p.add_argument("--threads", type=int_at_least(1), default=1)
    p.add_argument("--show", type=int_at_least(0), default=5, help="print this many transcripts")
    p.add_argument("--json", help="write per-question rows here")
    p.add_argument("--llm-asr", action="store_true", help="also the LLM's own transcript (see above)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="--llm-asr: questions per generate call")
    p.add_argument("--asr", help="also this ASR's transcript, e.g. faster-whisper (Whisper tiny.en) "
                                 "or transformers:NAME (echox.infer.asr.make_asr)")
    args = p.parse_args(argv)
    if args.json:  # before the run: a bad path would lose its results, an input be replaced
        from echox.fileio import check_out_path

        check_out_path(args.json, "--json", folder=False, inputs=[args.qa, args.model])
    torch.set_num_threads(args.threads)
    from echox.audio import load_audio
    from echox.eval.wer import edit_distance, normalize_words
    from echox.fileio import json_records
    from echox.model.echox import EchoX

    qa = Path(args.qa)
    items = json_records(qa, ("audio", "question"))[: args.n]  # checked before the model loads
    if not items:
        raise SystemExit(f"{qa}: no questions")
    model = EchoX.from_pretrained(args.model).eval()
    rows, waves = [], []
    for item in items:
        wave = load_audio(str(qa.parent / item["audio"]), 16000)
        waves.append(wave)
        r = probe(model, wave)
        r.update(id=item.get("id", str(len(rows))), question=item["question"])
        ref = normalize_words(item["question"])
        r["errors"], r["words"] = edit_distance(ref, normalize_words(r["ctc_text"])), len(ref)
        r["names_ctc"], r["names"] = name_recall(item["question"], r["ctc_text"])
        rows.append(r)
    def score(r: dict, who: str, text: str) -> None:
        r[f"{who}_text"] = text
        r[f"{who}_errors"] = edit_distance(normalize_words(r["question"]), normalize_words(text))
        r[f"names_{who}"] = name_recall(r["question"], text)[0]

    if args.llm_asr:
        for r, text in zip(rows, llm_transcripts(model, waves, args.batch_size)):
            score(r, "llm", text)
    if args.asr:
        from echox.infer.asr import make_asr

        asr = make_asr(args.asr)
        for r, wave in zip(rows, waves):
            score(r, "asr", asr.transcribe(wave, 16000).strip())
    for r in rows[: args.show]:
        print(f"{r['question']!r}\n  -> {r['ctc_text']!r} ({r['kept']}/{r['frames']} kept)")
        if "llm_text" in r:
            print(f"  LLM: {r['llm_text']!r}")
        if "asr_text" in r:
            print(f"  ASR: {r['asr_text']!r}")
    words, n_names = max(sum(r["words"] for r in rows), 1), max(sum(r["names"] for r in rows), 1)
    wer = sum(r["errors"] for r in rows) / words
    head = f"{'model':<40} {'n':>4} {'frames':>7} {'kept':>6} {'blank':>6} {'CTC WER':>8} {'CTC names':>9}"
    line = (f"{args.model[-40:]:<40} {len(rows):>4} {np.mean([r['frames'] for r in rows]):7.1f} "
            f"{np.mean([r['kept'] for r in rows]):6.1f} {np.mean([r['blank_share'] for r in rows]):6.2f} "
            f"{wer:8.3f} {sum(r['names_ctc'] for r in rows) / n_names:9.3f}")
    for who, on in (("llm", args.llm_asr), ("asr", args.asr)):
        if on:
            head += f" {who.upper() + ' WER':>8} {who.upper() + ' names':>9}"
            line += (f" {sum(r[f'{who}_errors'] for r in rows) / words:8.3f}"
                     f" {sum(r[f'names_{who}'] for r in rows) / n_names:9.3f}")
    print(head)
    print(line)
    if args.json:
        from echox.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import _cli

    sys.exit(_cli.run(main))
