"""The paper's eight switch-base-32 tasks.

Data: the hub datasets the original loaded (TASK_MAPPING_DATASET_ARGUMENTS: "glue", "super_glue",
"winogrande", "squad", "wiki_qa", "hotpot_qa"), under their current namespaced hub ids. Batch size and
learning rate: the original README's task-specific table. Metrics: what the original's evaluation
computed (evaluate's glue / super_glue / squad metrics; accuracy where it found no task metric), as
fractions in [0, 1]; the first is the one it selected checkpoints by.
"""
from __future__ import annotations

from . import prompts
from .base import CLASSIFICATION, GENERATIVE, Column, Task

SST2 = Task(
    name="sst2", hub_id="nyu-mll/glue", hub_config="sst2",
    columns=(Column("sentence", "text", doc="a movie-review sentence"),
             Column("label", "int", doc="0 negative, 1 positive, -1 unlabelled (test split)")),
    optional_columns=(Column("idx", "int"),),
    render=prompts.sst2, prompt_name="positive negative after", kind=CLASSIFICATION,
    label_words=prompts.SST2_WORDS, metrics=("accuracy",), batch_size=64, learning_rate=1e-4,
    description="sentiment of a movie-review sentence",
)

MRPC = Task(
    name="mrpc", hub_id="nyu-mll/glue", hub_config="mrpc",
    columns=(Column("sentence1", "text"), Column("sentence2", "text"),
             Column("label", "int", doc="0 not a paraphrase, 1 paraphrase, -1 unlabelled")),
    optional_columns=(Column("idx", "int"),),
    render=prompts.mrpc, prompt_name="paraphrase", kind=CLASSIFICATION,
    label_words=prompts.MRPC_WORDS, positive_label="yes", metrics=("accuracy", "f1"),
    batch_size=32, learning_rate=5e-5,
    description="is sentence2 a paraphrase of sentence1",
)

MULTIRC = Task(
    name="multirc", hub_id="aps/super_glue", hub_config="multirc",
    columns=(Column("paragraph", "text"), Column("question", "text"),
             Column("answer", "text", doc="one candidate answer to the question"),
             Column("label", "int", doc="0 wrong, 1 correct, -1 unlabelled")),
    optional_columns=(Column("idx", "dict", keys=(Column("paragraph", "int"), Column("question", "int")),
                             doc="{paragraph, question, answer} ids; f1_m and exact_match group answers by "
                                 "(paragraph, question); without idx, by the paragraph and question text"),),
    render=prompts.multirc, prompt_name="found_this_answer", kind=CLASSIFICATION,
    label_words=prompts.MULTIRC_WORDS, positive_label="Yes", metrics=("f1_a", "f1_m", "exact_match"),
    batch_size=32, learning_rate=3e-5,
    description="is this candidate answer to a question about the paragraph correct",
)

COPA = Task(
    name="copa", hub_id="aps/super_glue", hub_config="copa",
    columns=(Column("premise", "text"), Column("choice1", "text"), Column("choice2", "text"),
             Column("question", "text", doc='"cause" or "effect"'),
             Column("label", "int", doc="0 choice1, 1 choice2, -1 unlabelled")),
    optional_columns=(Column("idx", "int"),),
    render=prompts.copa, prompt_name="best_option", kind=CLASSIFICATION,
    example_choices=prompts.copa_choices, metrics=("accuracy",), batch_size=8, learning_rate=3e-5,
    description="which alternative is the cause / effect of the premise (the target is its text)",
)

WINOGRANDE = Task(
    name="winogrande", hub_id="allenai/winogrande", hub_config="winogrande_l",
    columns=(Column("sentence", "text", doc='a sentence with a "_" blank'),
             Column("option1", "text"), Column("option2", "text"),
             Column("answer", "text", doc='"1" or "2" (a string, as on the hub), "" unlabelled')),
    render=prompts.winogrande, prompt_name="True or False", kind=CLASSIFICATION,
    label_words=prompts.WINOGRANDE_WORDS, metrics=("accuracy",), batch_size=32, learning_rate=1e-5,
    description="does option1 fill the blank",
)

SQUAD = Task(
    name="squad", hub_id="rajpurkar/squad", hub_config=None,
    columns=(Column("context", "text"), Column("question", "text"),
             Column("answers", "dict", keys=(Column("text", "list[text]"),),
                    doc='{"text": [answer, ...], "answer_start": [int, ...]}; the target is the first text, '
                        "the metrics take the best match over all")),
    optional_columns=(Column("id", "text"), Column("title", "text")),
    render=prompts.squad, prompt_name="answer_given_context_and_question", kind=GENERATIVE,
    answers=prompts.squad_answers, metrics=("exact_match", "f1"), batch_size=16, learning_rate=5e-5,
    max_new_tokens=64, description="extractive question answering, generated as text",
)

WIKIQA = Task(
    name="wikiqa", hub_id="microsoft/wiki_qa", hub_config=None,
    columns=(Column("question", "text"), Column("document_title", "text"),
             Column("answer", "text", doc="a candidate answer sentence"),
             Column("label", "int", doc="0 not an answer, 1 an answer")),
    optional_columns=(Column("question_id", "text"),),
    render=prompts.wikiqa, prompt_name="Decide_good_answer", kind=CLASSIFICATION,
    label_words=prompts.WIKIQA_WORDS, metrics=("accuracy",), batch_size=32, learning_rate=5e-5,
    description="does this sentence answer the question",
)

HOTPOTQA = Task(
    name="hotpotqa", hub_id="hotpotqa/hotpot_qa", hub_config="distractor",
    columns=(Column("question", "text"), Column("answer", "text"),
             Column("supporting_facts", "dict", keys=(Column("title", "list[text]"), Column("sent_id", "list[int]")),
                    aligned=True, doc='{"title": [str, ...], "sent_id": [int, ...]}'),
             Column("context", "dict", keys=(Column("title", "list[text]"), Column("sentences", "list[list[text]]")),
                    aligned=True,
                    doc='{"title": [str, ...], "sentences": [[str, ...], ...]}; only the supporting '
                        "sentences reach the prompt")),
    optional_columns=(Column("id", "text"),),
    render=prompts.hotpotqa, prompt_name="generate_answer_affirmative", kind=GENERATIVE,
    metrics=("exact_match", "f1"), batch_size=32, learning_rate=1e-4, max_new_tokens=64,
    description="multi-hop question answering over the supporting facts, generated as text",
)

ALL_TASKS = (SST2, MRPC, MULTIRC, COPA, WINOGRANDE, SQUAD, WIKIQA, HOTPOTQA)
