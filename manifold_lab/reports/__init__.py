"""Tables, figures and Markdown reports built from stored results (nothing is trained here)."""
