"""Judges that rate two answers to one prompt, writing the two scores on their first line.

- ``EndpointJudge``: a judge model behind an OpenAI-compatible chat endpoint (``vllm serve``,
  Ray Serve LLM, or a hosted API). The API key comes from an environment variable, never a file.
- ``ReferenceJudge``: no model; rates each answer 1-10 by ROUGE-L F1 against the set's reference
  answer. It exists so the embedded default (no judge model on a laptop) still ends in a real,
  clearly labelled table; prompts without a reference are counted as unjudged.

``judge_pairs`` asks for both presentation orders of every prompt and never guesses a verdict.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

from rayapp import ASSETS
from rayapp.config import JudgeConfig
from rayapp.stages.evaluate.verdicts import Unparseable, verdict_from_reviews

JUDGE_SYSTEM = "You are a careful, impartial reviewer of answers written by AI assistants."

# The pairwise review protocol of this line of work, in our words (rayapp/assets/judge/
# pairwise.txt): both answers rated 1-10, the two scores alone on the first line, the reasons
# after. A config can name its own file (judge.prompt_file) to match a published protocol.
DEFAULT_PROMPT_FILE = str(ASSETS / "judge" / "pairwise.txt")
PROMPT_FIELDS = ("question", "answer_1", "answer_2")
_FIELD = re.compile(r"\{(question|answer_1|answer_2)\}")
# judge.length_neutral: appended to the prompt. LP's small subsets favour long answers (~460-550
# characters against ~280 for random ones), so this sentence can change a comparison's outcome.
LENGTH_NEUTRAL = "Their length must not sway you either: a longer answer is not a better one for being longer."


@dataclass(frozen=True)
class JudgePrompt:
    system: str
    template: str  # with {question}, {answer_1}, {answer_2}
    source: str
    length_neutral: bool

    @property
    def sha256(self) -> str:
        """What the judge is told, hashed: recorded with every judgment."""
        return hashlib.sha256(f"{self.system}\x00{self.template}".encode()).hexdigest()

    def render(self, question: str, answer_1: str, answer_2: str) -> str:
        # one pass over the template, not str.format or chained replaces: an answer may hold braces,
        # even "{answer_2}", and must reach the judge as written
        values = {"question": question, "answer_1": answer_1, "answer_2": answer_2}
        return _FIELD.sub(lambda m: values[m.group(1)], self.template)

    def describe(self) -> str:
        where = "rayapp's default" if self.source == DEFAULT_PROMPT_FILE else self.source
        return (f"prompt {where} (sha256 {self.sha256[:12]}), length-neutral sentence "
                f"{'on' if self.length_neutral else 'off'}")


def judge_prompt(cfg: JudgeConfig) -> JudgePrompt:
    """The judge prompt a config names: its file (rayapp's default unless set), checked for the three
    fields, plus the length-neutral sentence when asked for."""
    path = cfg.prompt_file or DEFAULT_PROMPT_FILE
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read().strip()
    except OSError as exc:
        raise JudgeError(f"evaluate.judge.prompt_file: cannot read {path}: {exc.strerror}") from None
    missing = [name for name in PROMPT_FIELDS if "{" + name + "}" not in template]
    if missing:
        raise JudgeError(f"evaluate.judge.prompt_file {path}: the template lacks "
                         f"{', '.join('{' + m + '}' for m in missing)} (it needs {{question}}, {{answer_1}} "
                         f"and {{answer_2}})")
    if cfg.length_neutral:
        template = f"{template}\n{LENGTH_NEUTRAL}"
    return JudgePrompt(system=cfg.system_prompt or JUDGE_SYSTEM, template=template, source=path,
                       length_neutral=cfg.length_neutral)


class JudgeError(RuntimeError):
    pass


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def describe_judge(cfg: JudgeConfig) -> str:
    """The judge's name for reports, from its config alone (no client built, no key needed): for a
    judge model, with the prompt it is given (file, hash, length-neutral sentence)."""
    if cfg.kind == "reference":
        return ReferenceJudge.name
    return f"{cfg.model} @ {cfg.base_url}; {judge_prompt(cfg).describe()}"


def prompt_record(cfg: JudgeConfig) -> dict:
    """What every judgment file records about the prompt (none for the ROUGE-L reference judge)."""
    if cfg.kind == "reference":
        return {"judge_prompt_sha256": None}
    p = judge_prompt(cfg)
    return {"judge_prompt_sha256": p.sha256, "judge_prompt_file": p.source, "length_neutral": p.length_neutral}


class EndpointJudge:
    kind = "endpoint"

    def __init__(self, cfg: JudgeConfig):
        from openai import OpenAI

        if not cfg.base_url or not cfg.model:
            raise JudgeError("evaluate.judge.base_url and evaluate.judge.model are required for an endpoint judge")
        key = os.environ.get(cfg.api_key_env)
        if not key:
            if not _is_loopback(cfg.base_url):
                raise JudgeError(f"the judge at {cfg.base_url} needs an API key: set the environment "
                                 f"variable {cfg.api_key_env} (keys are never read from config files)")
            key = "unused"  # a local `vllm serve` without --api-key accepts any key
        self.cfg = cfg
        self.prompt = judge_prompt(cfg)
        self.name = describe_judge(cfg)
        self.client = OpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=cfg.retries)

    def review(self, question: str, answer_1: str, answer_2: str, reference: str | None = None) -> str:
        resp = self.client.chat.completions.create(
            model=self.cfg.model,
            messages=[{"role": "system", "content": self.prompt.system},
                      {"role": "user", "content": self.prompt.render(question, answer_1, answer_2)}],
            temperature=self.cfg.temperature,
            max_tokens=self.cfg.max_tokens,
        )
        return resp.choices[0].message.content or ""


class NoReference(Exception):
    """The reference judge cannot rate a prompt that has no reference answer."""


class ReferenceJudge:
    kind = "reference"
    name = "ROUGE-L F1 against the reference answer (no judge model)"

    def __init__(self, cfg: JudgeConfig | None = None):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge_l(self, answer: str, reference: str) -> float:
        return self.scorer.score(reference, answer)["rougeL"].fmeasure

    def review(self, question: str, answer_1: str, answer_2: str, reference: str | None = None) -> str:
        if not reference:
            raise NoReference()
        r1, r2 = self.rouge_l(answer_1, reference), self.rouge_l(answer_2, reference)
        # 1 + 9*F1, to one decimal: the same first-line format a judge model writes
        s1, s2 = round(1 + 9 * r1, 1), round(1 + 9 * r2, 1)
        return f"{s1:g} {s2:g}\nROUGE-L F1 against the reference: assistant 1 {r1:.3f}, assistant 2 {r2:.3f}."


def make_judge(cfg: JudgeConfig):
    return ReferenceJudge(cfg) if cfg.kind == "reference" else EndpointJudge(cfg)


def judge_pairs(judge, items: list[dict], max_concurrency: int = 8) -> list[dict]:
    """Judge each ``{set, id, question, reference, answer_a, answer_b}`` in both orders.

    Returns one record per prompt with both raw judge texts and the verdict for model A:
    win / tie / lose, 'unparseable' (a text whose scores cannot be read; its reason is kept),
    or 'unjudged' (the judge could not be asked, e.g. no reference answer).
    """

    def one(item: dict) -> dict:
        rec = {k: item[k] for k in ("set", "id")}
        try:
            ab = judge.review(item["question"], item["answer_a"], item["answer_b"], item.get("reference"))
            ba = judge.review(item["question"], item["answer_b"], item["answer_a"], item.get("reference"))
        except NoReference:
            return {**rec, "review_ab": None, "review_ba": None, "verdict": "unjudged", "reason": "no reference answer"}
        except Exception as exc:
            # A request the judge refuses (HTTP 400, e.g. over its context length) is that prompt's
            # problem: counted with the reason. Anything else (unreachable, bad key) stops the stage.
            if type(exc).__name__ == "BadRequestError":
                return {**rec, "review_ab": None, "review_ba": None, "verdict": "unjudged",
                        "reason": f"judge refused the request: {str(exc)[:200]}"}
            raise JudgeError(f"judge request for {item['set']}/{item['id']} failed: {exc}") from exc
        rec.update(review_ab=ab, review_ba=ba)
        try:
            rec.update(verdict=verdict_from_reviews(ab, ba), reason=None)
        except Unparseable as exc:
            rec.update(verdict="unparseable", reason=str(exc))
        return rec

    with ThreadPoolExecutor(max_workers=max(1, max_concurrency)) as pool:
        return list(pool.map(one, items))
