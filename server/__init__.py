"""fedenc ServerApp: coordination, aggregation and central evaluation."""
