"""Model families; each module registers one `FamilySpec` (imported on first registry look-up)."""
