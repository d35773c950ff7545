"""Task records: records -> prompts -> tokens with answer-only labels."""
