"""Train a small Llama model (and its tokenizer) that retrieves from long contexts.

    python -m apb.tools.retrieval --out apb/data/retrieval-model [--stages ...] [--seed 0]

What it does, in order (all seeded; ``--threads`` CPU threads), and which module does it:

1. :mod:`.tokenizer` trains a byte-level BPE tokenizer with the ``tokenizers`` library on the
   haystack text (the standard-library source of :mod:`apb.tools.tasks`) plus a drill of task
   sentences (:func:`~.tokenizer.tokenizer_drill`), so each key word, each variable name and
   each cue word is one token, and digits go in pairs (a 5-digit value is always 3 tokens).
   Specials ``<pad> <s> </s>``; saved as a ``PreTrainedTokenizerFast`` with bos/eos/pad set and
   no chat template.
2. :mod:`.init` builds a ``LlamaConfig`` model (see ``--hidden`` etc.) and starts the attention
   heads that retrieval needs (:func:`~.init.init_previous_token_heads`,
   :func:`~.init.init_feature_heads`).
3. :mod:`.train` trains it with AdamW on *dense* sequences from
   :func:`apb.tools.tasks.make_training_sequence` (laid out by :mod:`.data`): a haystack holding
   many needles of all three tasks, then many ``\\n\\nQuestion: q\\nAnswer: a</s>`` pairs, with
   the loss only on the answer tokens and eos. The first pair follows the context exactly as
   :func:`apb.model.text.encode_document` builds a prompt. It follows a short-to-long curriculum
   (``--stages LEN:BATCH:MAX_STEPS,...``). Every ``--eval-every`` steps :mod:`.evaluate`
   measures held-out accuracy per task at the stage length (teacher forced: an example counts
   as correct when the greedy argmax is right at every answer token and at eos, which is exactly
   when greedy decoding returns the answer) and the run moves to the next stage once passkey and
   niah reach ``--advance-at`` and vt ``--advance-at-vt``. The last stage runs to its step
   count, with the learning rate decaying to 10% over it.
4. :mod:`.train` saves ``config.json``, ``model.safetensors``, the tokenizer files and
   ``training_log.json`` (the learning curve) into ``--out``; a resumable checkpoint goes to
   ``--ckpt`` every ``--ckpt-every`` steps (``--resume`` picks it up).

``--eval-only DIR`` instead measures a saved model with plain ``generate`` (greedy, prompt from
:func:`apb.model.text.encode_document`; :func:`.evaluate.generate_eval`) and records the result
under ``final_eval`` in ``DIR/training_log.json``. ``--plot-curve LOG PNG`` draws a saved
learning curve (:mod:`.plots`). The command line is :mod:`.__main__`.
"""
