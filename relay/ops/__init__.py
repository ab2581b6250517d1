"""Running a role: config loading, logs, metrics plumbing, the internal HTTP listener
(metrics and health), reload and the process runtime."""
