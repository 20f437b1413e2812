"""diffaccel.pipelines: high-resolution pipelines built on diffaccel (filled by later work)."""
