"""Tools that measure the runtime, never used by it: verify (against plain Hugging Face), bench
(wall and projected time), evaluate and tasks (accuracy), simulate (the analytical cost model)
and retrieval (training the small packaged retrieval model)."""
