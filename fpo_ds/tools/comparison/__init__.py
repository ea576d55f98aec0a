"""The paper's comparison: the job graph behind slurm/compare.sh and the table `fpo-ds compare-report` fills."""
