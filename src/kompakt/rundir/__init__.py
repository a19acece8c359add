"""The run directory's primitives: step identities (hashing), lineage.jsonl, the step save, and the
layout (ownership, step directories and markers, the `final` link).

They sit below everything that writes or reads a run (recipe's runner, auto, report, and the
training passes' checkpoint ids) so all of those read them downward. They import only
kompakt.errors, kompakt.atomic and kompakt.model.
"""
