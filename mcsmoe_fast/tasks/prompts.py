"""The paper's prompts: the promptsource templates the original code applied, written out in plain Python.

The original (UNITES-Lab/MC-SMoE, mcsmoe/data/preprocessors.py) picked one promptsource template per task
(TASK_MAPPING_PROMPT_KEY) and applied it with `promptsource.templates.Template.apply`. Each function here
renders the same (source, target) strings as that template does, without promptsource or jinja:

- every `{{ field }}` is cut to 2048 characters the way jinja's `truncate` filter does (promptsource
  appends `| string | truncate(2048)` to every variable), so long MultiRC / SQuAD paragraphs end in "...";
- the rendered text is split at "|||" and both halves are stripped;
- the templates' own whitespace is kept (COPA's "premise \\n\\n" and "looking for  a cause", HotpotQA's
  blank lines between facts): the T5 tokenizer folds runs of whitespace, so this costs nothing and keeps
  the text identical to the original's.

A function returns target None for an unlabelled example (label -1 in GLUE/SuperGLUE test splits, an
empty WinoGrande answer, a SQuAD example without answers); Task.to_text turns that into a clear error.
"""
from __future__ import annotations

from collections.abc import Mapping

TEXT_VAR_LENGTH = 2048  # promptsource's per-variable truncation
_LEEWAY = 5  # jinja's default truncate.leeway policy


def truncate(value, length: int = TEXT_VAR_LENGTH) -> str:
    """str(value) cut like jinja's `truncate(length)`: unchanged up to length + 5 characters, otherwise cut
    at the last space before length - 3 characters and ended with "..."."""
    text = str(value)
    if len(text) <= length + _LEEWAY:
        return text
    return text[: length - 3].rsplit(" ", 1)[0] + "..."


def _label(example: Mapping, words: tuple[str, ...]) -> str | None:
    """The label word of an int label column (None for -1, the unlabelled marker)."""
    label = example["label"]
    if label == -1:
        return None
    if not 0 <= label < len(words):
        raise ValueError(f"label {label!r} out of range: expected -1 (unlabelled) or 0..{len(words) - 1} "
                         f"({', '.join(words)})")
    return words[label]


SST2_WORDS = ("negative", "positive")
MRPC_WORDS = ("no", "yes")
MULTIRC_WORDS = ("No", "Yes")
WINOGRANDE_WORDS = ("true", "false")  # the template's True/False, lower-cased by the original
WIKIQA_WORDS = ("No", "Yes")


def sst2(example: Mapping) -> tuple[str, str | None]:
    """glue/sst2, template "positive negative after"."""
    source = f"{truncate(example['sentence'])}\nQuestion: Was that sentence positive or negative? Answer:"
    return source.strip(), _label(example, SST2_WORDS)


def mrpc(example: Mapping) -> tuple[str, str | None]:
    """glue/mrpc, template "paraphrase"."""
    source = (f"Does the sentence\n{truncate(example['sentence1'])}\nparaphrase (that is, mean the same thing as) "
              f"this sentence?\n{truncate(example['sentence2'])}")
    return source.strip(), _label(example, MRPC_WORDS)


def multirc(example: Mapping) -> tuple[str, str | None]:
    """super_glue/multirc, template "found_this_answer"."""
    source = (f"{truncate(example['paragraph'])}\n\nQuestion: {truncate(example['question'])}\n"
              f"I found this answer \"{truncate(example['answer'])}\". Is that correct? Yes or no?")
    return source.strip(), _label(example, MULTIRC_WORDS)


def copa_choices(example: Mapping) -> tuple[str, str]:
    """COPA's answer choices: the two alternatives' own text (not truncated, as in promptsource)."""
    return str(example["choice1"]).strip(), str(example["choice2"]).strip()


def copa(example: Mapping) -> tuple[str, str | None]:
    """super_glue/copa, template "best_option"; the target is the text of the right alternative."""
    question = example["question"]
    if question not in ("cause", "effect"):
        raise ValueError(f"question {question!r}: expected \"cause\" or \"effect\"")
    wanted = " a cause " if question == "cause" else " an effect "
    source = (f"{truncate(example['premise'])} \n\nWhat's the best option?\n- {truncate(example['choice1'])}\n"
              f"- {truncate(example['choice2'])}\n\nWe are looking for {wanted}")
    label = example["label"]
    if label == -1:
        return source.strip(), None
    if label not in (0, 1):
        raise ValueError(f"label {label!r} out of range: expected -1 (unlabelled), 0 (choice1) or 1 (choice2)")
    return source.strip(), truncate(copa_choices(example)[label])


def winogrande(example: Mapping) -> tuple[str, str | None]:
    """winogrande/winogrande_l, template "True or False": is option1 the referent of "_"? Target "true" when
    the answer is "1", "false" when it is "2" (the original lower-cased the template's True/False)."""
    source = (f"The _ in the sentence below refers to {truncate(example['option1'])}. True or False?\n"
              f"{truncate(example['sentence'])}")
    answer = str(example["answer"]).strip()
    if answer == "":
        return source.strip(), None
    if answer not in ("1", "2"):
        raise ValueError(f"answer {example['answer']!r}: expected \"1\", \"2\" or \"\" (unlabelled)")
    return source.strip(), WINOGRANDE_WORDS[int(answer) - 1]


def squad_answers(example: Mapping) -> list[str]:
    """Every gold answer text of a SQuAD example (the metric takes the best match over them)."""
    return [str(a) for a in example["answers"]["text"]]


def squad(example: Mapping) -> tuple[str, str | None]:
    """squad, template "answer_given_context_and_question"; the target is the first gold answer."""
    source = (f"{truncate(example['context'])}\n\nQ: {truncate(example['question'])}\n\n"
              "Referring to the passage above, the correct answer to the given question is")
    answers = squad_answers(example)
    return source.strip(), (truncate(answers[0]).strip() if answers else None)


def wikiqa(example: Mapping) -> tuple[str, str | None]:
    """wiki_qa, template "Decide_good_answer": is this sentence a correct answer to the question?"""
    source = (f"This is a correct answer to the following question about {truncate(example['document_title'])}. "
              f"Yes or no?\nAnswer: {truncate(example['answer'])}\nQuestion: {truncate(example['question'])}")
    return source.strip(), _label(example, WIKIQA_WORDS)


def supporting_sentences(example: Mapping) -> list[list[str]]:
    """HotpotQA context reduced to its supporting facts, as the original did before applying the template
    (keep_only_supporting_facts_in_context_for_hotpotqa): one list of sentences per supporting title, titles
    in order of first mention, sentences in the order the facts list them; facts that point past the end
    of their paragraph are skipped."""
    context, facts = example["context"], example["supporting_facts"]
    kept: dict[str, list[str]] = {}
    for title, sent_id in zip(facts["title"], facts["sent_id"]):
        if title not in context["title"]:
            raise ValueError(f"supporting fact title {title!r} is not in the example's context titles")
        sentences = context["sentences"][context["title"].index(title)]
        if sent_id >= len(sentences):
            continue
        kept.setdefault(title, []).append(sentences[sent_id])
    return list(kept.values())


def hotpotqa(example: Mapping) -> tuple[str, str | None]:
    """hotpot_qa/distractor, template "generate_answer_affirmative", over the supporting facts only."""
    facts = "".join(f"\n  - {truncate(''.join(sentences))}\n" for sentences in supporting_sentences(example))
    source = (f"Answer the following question, \"{truncate(example['question'])}\", using the information provided "
              f"below.\n\n{facts}")
    answer = truncate(example["answer"]).strip()
    return source.strip(), (answer or None)
