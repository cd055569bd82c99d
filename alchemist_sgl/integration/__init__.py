"""The ONLY package that imports sglang: plugin hooks, launch, hook-point manifest, views of SGLang objects."""
