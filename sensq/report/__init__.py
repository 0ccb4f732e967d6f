"""Reports: rendered files (PNG, Markdown, self-contained HTML) from sensq's JSON outputs."""
