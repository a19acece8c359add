"""`kompakt compress --target`: parse the target, measure the model's facts, plan, run the attempts
with back-offs, deliver the exports and the report. Reads recipe/ (schema, runner) and report/
downward; nothing below imports it."""
