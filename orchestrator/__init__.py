"""insight-orchestrator: bulk imports into Dotdigital Insight data, fast and without losing a record."""
