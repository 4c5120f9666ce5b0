"""SQL migrations per dialect (sqlite/, postgresql/), applied in order by vigil_gateway.migrate."""
