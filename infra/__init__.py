"""Everything that talks to AWS through boto3; imports nothing else of dlbox.

`ami` finds the Deep Learning AMI, `network` sets up the key pair and security group,
`instances` launches, waits for, finds and terminates instances, `prices` prices them.
Frozen dataclasses from `models` cross the boundary; errors derive from `InfraError`.
"""
