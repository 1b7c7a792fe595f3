"""Memory: measure (tracker, measure), estimate, plan and fit (timeline, estimate, gpus, fit, plan,
verify), and recover from out-of-memory (recover)."""
