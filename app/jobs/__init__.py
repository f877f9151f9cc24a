"""The job path: routing a job to an instance, running it there, and what happens around that."""
