"""Everything that talks to AWS through boto3; imports nothing else of dlbox."""
