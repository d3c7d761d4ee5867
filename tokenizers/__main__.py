"""``python -m manifold_lab.tokenizers NAME``: train (once) and locate a tokenizer's default checkpoint."""

from manifold_lab.tokenizers.pretrained import main

raise SystemExit(main())
