"""Tasks: one module per task (`gsm`, `mmlu`, `super_ni`, `open`) declaring its data source
format, prompt and score together (`task` holds the types they are made of), registered once in
`registry`; and `examples`, task records -> prompts -> tokens with answer-only labels."""
