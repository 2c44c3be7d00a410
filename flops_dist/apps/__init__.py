"""Applications built on the core, outside it: black-box targets (soft prompts, prompt codes,
projections) and the frozen MiniLM encoder with its losses (needs the `foundation` extra)."""
