"""Running a job: task objects, the driver, executors, the shard worker, the output folder, guards, metrics, pictures."""
