from sagaplatform.kernel.errors import BusinessError


class ShipmentNotDispatchable(BusinessError):
    code = "shipment_not_dispatchable"


class AlreadyDispatched(BusinessError):
    code = "already_shipped"
