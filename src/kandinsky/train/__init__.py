"""Training the scaled-down Kandinsky 2.1 bundled with the package, and fine-tuning published checkpoints.

Stages (each ``python -m kandinsky.train STAGE --out DIR``): data, tokenizers, clip, mclip, movq, prior,
decoder, inpaint; ``all`` runs them in order and exports diffusers-format folders (``export``).
"""
