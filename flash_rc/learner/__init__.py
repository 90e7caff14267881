"""The bf16 FSDP2 learner (not implemented yet: a later issue)."""
