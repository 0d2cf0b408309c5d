#!/bin/bash
# LocalStack init hook (ready.d): the bucket the gateway stores into.
awslocal s3 mb s3://dicom-gateway
