"""Memory: measure (tracker, measure), estimate, plan and fit (estimate, gpus, fit, plan,
verify), and recover from out-of-memory (recover)."""
