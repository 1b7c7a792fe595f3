"""Memory: measure (tracker), and, in later modules, estimate, fit and recover."""
