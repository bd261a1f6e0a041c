"""Model sources: HF directories, Hub ids, the bundled sample; lazy weights; architecture mappings."""
