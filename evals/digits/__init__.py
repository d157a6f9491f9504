"""The digits benchmark: its rules (prompts, scoring) and the models that score it."""
